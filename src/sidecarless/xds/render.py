"""Plan -> Envoy resources. Pure: no I/O; the same Plan gives byte-identical resources.

One transparent listener on the proxy port holds a filter chain per proxied (pod address, port). Each chain's
HTTP connection manager takes its routes, and with them its RBAC policy, from RDS: a route update applies to
the next request on connections already open, whereas a listener update would leave them on the old policy
until they drain (ARCHITECTURE.md). The listener's own RBAC filter allows nothing, so a route without a
per-route policy denies; generated per-route policies always carry `rules`.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from sidecarless.policy.compile import ANY_IDENTITY, EndpointPolicy, L7Allow, Plan, ProxiedPort
from sidecarless.policy.schema import HttpRule

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

ORIGINAL_DESTINATION_CLUSTER = "sidecarless/original-destination"
INGRESS_LISTENER = "sidecarless/ingress-proxy"
RBAC_FILTER = "envoy.filters.http.rbac"


@dataclass(frozen=True)
class Resources:
    """Envoy resources by type URL, then by name."""

    by_type: dict[str, dict[str, Message]]


def route_name(endpoint: EndpointPolicy, port: ProxiedPort) -> str:
    return f"{endpoint.endpoint.key}:{port.port}"


def render(plan: Plan, proxy_port: int, listen_address: str = "0.0.0.0") -> Resources:
    clusters: dict[str, Message] = {ORIGINAL_DESTINATION_CLUSTER: _original_destination_cluster()}
    routes: dict[str, Message] = {}
    chains = []
    for endpoint in plan.endpoints:
        for port in endpoint.proxied:
            name = route_name(endpoint, port)
            routes[name] = _route_configuration(name, port)
            chains.append(_filter_chain(name, endpoint.endpoint.ip, port.port))
    listeners: dict[str, Message] = {}
    if chains:
        listeners[INGRESS_LISTENER] = _listener(listen_address, proxy_port, chains)
    return Resources({CLUSTER_TYPE: clusters, LISTENER_TYPE: listeners, ROUTE_TYPE: routes})


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _original_destination_cluster() -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=ORIGINAL_DESTINATION_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=2),
    )


def _listener(
    listen_address: str, proxy_port: int, chains: list[listener_components_pb2.FilterChain]
) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=INGRESS_LISTENER,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=listen_address, port_value=proxy_port)
        ),
        # IP_TRANSPARENT: the listener answers for the original destination's address.
        transparent=wrappers_pb2.BoolValue(value=True),
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.original_dst",
                typed_config=pack(original_dst_pb2.OriginalDst()),
            )
        ],
        filter_chains=chains,
    )


def _filter_chain(name: str, ip: str, port: int) -> listener_components_pb2.FilterChain:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name.replace("/", "_").replace(":", "_"),
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
            route_config_name=name,
        ),
        # Match the path a backend would act on: `..`, `//` and escaped slashes cannot reach a denied path.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
        http_filters=[
            hcm_pb2.HttpFilter(
                name=RBAC_FILTER,
                typed_config=pack(
                    rbac_pb2.RBAC(rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW))
                ),
            ),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())),
        ],
    )
    return listener_components_pb2.FilterChain(
        name=name,
        filter_chain_match=listener_components_pb2.FilterChainMatch(
            destination_port=wrappers_pb2.UInt32Value(value=port),
            prefix_ranges=[
                address_pb2.CidrRange(address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=32))
            ],
        ),
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
            )
        ],
    )


def _route_configuration(name: str, port: ProxiedPort) -> route_pb2.RouteConfiguration:
    policies = {
        f"allow-{index}": _rbac_policy(allow)
        for index, allow in enumerate(port.allows)
        if allow.peer.ips or allow.peer.identity == ANY_IDENTITY
    }
    per_route = rbac_pb2.RBACPerRoute(
        rbac=rbac_pb2.RBAC(rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW, policies=policies))
    )
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(
                            cluster=ORIGINAL_DESTINATION_CLUSTER,
                            timeout=duration_pb2.Duration(seconds=0),
                        ),
                        typed_per_filter_config={RBAC_FILTER: pack(per_route)},
                    )
                ],
            )
        ],
    )


def _rbac_policy(allow: L7Allow) -> rbac_config_pb2.Policy:
    if allow.peer.identity == ANY_IDENTITY:
        principal = rbac_config_pb2.Principal(any=True)
    else:
        principal = rbac_config_pb2.Principal(
            or_ids=rbac_config_pb2.Principal.Set(
                ids=[
                    rbac_config_pb2.Principal(
                        direct_remote_ip=address_pb2.CidrRange(
                            address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=32)
                        )
                    )
                    for ip in allow.peer.ips
                ]
            )
        )
    return rbac_config_pb2.Policy(
        principals=[principal],
        permissions=[
            rbac_config_pb2.Permission(
                or_rules=rbac_config_pb2.Permission.Set(rules=[_permission(rule) for rule in allow.http])
            )
        ],
    )


def _permission(rule: HttpRule) -> rbac_config_pb2.Permission:
    conditions = []
    if rule.method is not None:
        conditions.append(
            rbac_config_pb2.Permission(
                header=route_components_pb2.HeaderMatcher(
                    name=":method", string_match=_full_match(rule.method)
                )
            )
        )
    if rule.path is not None:
        # url_path is the path without the query string, after normalisation.
        conditions.append(
            rbac_config_pb2.Permission(url_path=path_pb2.PathMatcher(path=_full_match(rule.path)))
        )
    if not conditions:
        return rbac_config_pb2.Permission(any=True)
    return rbac_config_pb2.Permission(and_rules=rbac_config_pb2.Permission.Set(rules=conditions))


def _full_match(pattern: str) -> string_pb2.StringMatcher:
    # safe_regex matches the whole value (RE2), as Cilium's rules mean.
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))
