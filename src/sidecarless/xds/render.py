"""Plan -> Envoy resources. Pure: no I/O; the same Plan gives byte-identical resources.

Two transparent listeners, one per direction, each on its own proxy port (the TC program's mark says which):
- ingress: a filter chain per pod with ingress L7 rules, matched on the pod's address (the original
  destination); its RBAC holds that pod's ingress rules.
- egress: a filter chain per pod with egress L7 rules, matched on the pod's address as source; its RBAC holds
  the pod's egress rules, and a second RBAC the ingress L7 rules of destination pods on this node that apply
  to it, so a flow governed on both sides is checked against both in one pass.
Each chain's HTTP connection manager takes its routes, and with them its RBAC policies, from RDS: a route
update applies to the next request on connections already open, whereas a listener update would leave them
on the old policy until they drain (ARCHITECTURE.md). The listener's own RBAC filters allow nothing, so a
route without per-route policy denies; generated per-route policies always carry `rules`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from envoy.config.accesslog.v3 import accesslog_pb2 as accesslog_config_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as grpc_accesslog_pb2
from envoy.extensions.access_loggers.stats.v3 import stats_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.v3 import percent_pb2, range_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from sidecarless.envoy.bootstrap import ACCESS_LOG_FORWARDED_KEY, XDS_CLUSTER
from sidecarless.policy.audit import audit_view
from sidecarless.policy.identity import ANY_IDENTITY, AddressSet
from sidecarless.policy.model import EGRESS, INGRESS, HttpRule
from sidecarless.policy.plan import REDIRECT, EndpointPolicy, Plan, PolicyEntry
from sidecarless.xds import header_actions
from sidecarless.xds.resources import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE

ORIGINAL_DESTINATION_CLUSTER = "sidecarless/original-destination"
LISTENERS = {INGRESS: "sidecarless/ingress", EGRESS: "sidecarless/egress"}
INGRESS_RBAC = "sidecarless.ingress_rbac"
EGRESS_RBAC = "sidecarless.egress_rbac"
ENFORCING_RBAC = {INGRESS: INGRESS_RBAC, EGRESS: EGRESS_RBAC}
# After the enforcing filters, RBAC filters that enforce nothing: their shadow rules name the HTTP rule that
# matched (`<group>_shadow_effective_policy_id`), which the header actions and the hit counts read.
RULE_RBAC = {INGRESS: "sidecarless.ingress_rule", EGRESS: "sidecarless.egress_rule"}
# Audit mode: RBAC filters that enforce nothing; their shadow rules hold the audit verdict (policy/audit.py),
# which they record in dynamic metadata as `audit_<group>_shadow_engine_result` for the access log.
AUDIT_RBAC = {INGRESS: "sidecarless.audit_ingress", EGRESS: "sidecarless.audit_egress"}
AUDIT_FILTERS = frozenset(AUDIT_RBAC.values())
ENFORCE_NOTHING_FILTERS = AUDIT_FILTERS | frozenset(RULE_RBAC.values())
AUDIT_PREFIX = "audit_"
RBAC_METADATA = "envoy.filters.http.rbac"


@dataclass(frozen=True)
class Resources:
    """Envoy resources by type URL, then by name."""

    by_type: dict[str, dict[str, Message]]


def chain_name(endpoint: EndpointPolicy, direction: str) -> str:
    """The name of a pod's filter chain, and of its route configuration, in one direction."""
    return f"{direction}/{endpoint.endpoint.key}"


def proxied_directions(endpoint: EndpointPolicy) -> list[str]:
    return [direction for direction in (INGRESS, EGRESS) if endpoint.direction(direction).redirects]


def render(
    plan: Plan, proxy_ports: Mapping[str, int], listen_address: str = "::", egress_mark: int | None = None
) -> Resources:
    return Renderer(proxy_ports, listen_address, egress_mark).render(plan)


class Destination(NamedTuple):
    """A destination pod of this node whose ingress L7 entry applies to a source's egress chain."""

    pod: str  # namespace/name
    prefixes: tuple[str, ...]  # its addresses, /32 and /128
    entry: PolicyEntry


@dataclass(frozen=True)
class _Chain:
    """One pod's filter chain and route configuration in one direction, and what they were rendered from."""

    inputs: tuple[object, ...]
    filter_chain: listener_components_pb2.FilterChain
    route: route_pb2.RouteConfiguration


class Renderer:
    """render with a memory of the previous render: a pod's chain and routes are rendered again only when what
    they are made of changed (its policy, its peers' addresses, for egress the ingress L7 rules of the
    destinations on this node). With Compiler, a policy change renders only the pods it selects."""

    def __init__(
        self, proxy_ports: Mapping[str, int], listen_address: str = "::", egress_mark: int | None = None
    ) -> None:
        """`egress_mark`: the egress listener connects upstream from the client pod's own address, its packets
        marked so (the datapath's mark for them); None: from the node's address."""
        self.proxy_ports = dict(proxy_ports)
        self.listen_address = listen_address
        self.egress_mark = egress_mark
        self._chains: dict[str, _Chain] = {}

    def render(self, plan: Plan) -> Resources:
        rendered: dict[str, _Chain] = {}
        chains: dict[str, list[listener_components_pb2.FilterChain]] = {INGRESS: [], EGRESS: []}
        for endpoint in plan.endpoints:
            for direction in proxied_directions(endpoint):
                name = chain_name(endpoint, direction)
                destinations = _destination_entries(plan, endpoint) if direction == EGRESS else ()
                # Everything the chain is rendered from. Compared item by item: an unchanged pod's policy and
                # addresses are the previous objects (Compiler), so the comparison is cheap.
                peer_addresses = tuple(
                    plan.address_set(e.peer_identity) for e in endpoint.direction(direction).redirects
                )
                inputs = (endpoint, peer_addresses, destinations)
                chain = self._chains.get(name)
                if chain is None or chain.inputs != inputs:
                    chain = _Chain(inputs, *_render_chain(plan, endpoint, direction, name, destinations))
                rendered[name] = chain
                chains[direction].append(chain.filter_chain)
        self._chains = rendered
        listeners: dict[str, Message] = {
            LISTENERS[direction]: _listener(
                LISTENERS[direction],
                self.listen_address,
                self.proxy_ports[direction],
                chains[direction],
                self.egress_mark if direction == EGRESS else None,
            )
            for direction in (INGRESS, EGRESS)
            if chains[direction]
        }
        clusters: dict[str, Message] = {ORIGINAL_DESTINATION_CLUSTER: _original_destination_cluster()}
        routes: dict[str, Message] = {name: chain.route for name, chain in rendered.items()}
        return Resources({CLUSTER_TYPE: clusters, LISTENER_TYPE: listeners, ROUTE_TYPE: routes})


def _render_chain(
    plan: Plan, endpoint: EndpointPolicy, direction: str, name: str, destinations: tuple[Destination, ...]
) -> tuple[listener_components_pb2.FilterChain, route_pb2.RouteConfiguration]:
    redirects = endpoint.direction(direction).redirects
    if direction == INGRESS:
        enforcing = {INGRESS: _ingress_policies(plan, redirects)}
    else:
        enforcing = {EGRESS: _egress_policies(plan, redirects), INGRESS: _ingress_policies_for_source(destinations)}
    rules = _chain_rules(endpoint, direction, destinations)
    per_filter = {ENFORCING_RBAC[group]: _rbac_per_route(policies, group) for group, policies in enforcing.items()}
    per_filter |= {RULE_RBAC[group]: _rule_per_route(group, rules[group]) for group in enforcing if rules[group]}
    audited = any(e.audit is not None for e in (*redirects, *(d.entry for d in destinations)))
    if audited:
        per_filter.update(_audit_per_route(plan, direction, redirects, destinations))
    metadata = header_actions.route_metadata({n: r.rule for group in rules.values() for n, r in group.items()})
    # The audit filters first: an enforcing filter that denies answers at once, and the filters after it never
    # see the request. Each rule filter right after its enforcing filter: it reads which policy allowed the
    # request, and names the egress rule of a request the destination's ingress rules then deny.
    rbac_filters = [
        *(AUDIT_RBAC[group] for group in enforcing if audited),
        *(name for group in enforcing for name in (ENFORCING_RBAC[group], RULE_RBAC[group])),
    ]
    logged = _headers_to_log([*redirects, *(d.entry for d in destinations)])
    filter_chain = _filter_chain(
        name, endpoint.endpoint.prefixes, direction, rbac_filters, metadata is not None, logged
    )
    return filter_chain, _route_configuration(name, per_filter, metadata, direction)


class ChainRule(NamedTuple):
    """An HTTP rule of a chain, and the enforcing policy that holds it."""

    policy: str
    rule: HttpRule


def _chain_rules(
    endpoint: EndpointPolicy, direction: str, destinations: tuple[Destination, ...]
) -> dict[str, dict[str, ChainRule]]:
    """Per group, every HTTP rule of the chain by the name of its shadow rule: the enforcing policy that holds
    it and its place there. RBAC tries a filter's policies in name order; a rule's shadow policy matches only
    requests its own enforcing policy allowed, so the first to match is the rule `policy trace` names."""
    redirects = endpoint.direction(direction).redirects
    by_policy = {name: group[0].http for name, group in _same_requests(redirects).items()}
    if direction == INGRESS:
        return {INGRESS: _rule_names(by_policy)}
    by_destination = {_destination_policy_name(pod, entry): entry.http for pod, _, entry in destinations}
    return {EGRESS: _rule_names(by_policy), INGRESS: _rule_names(by_destination)}


def _rule_names(by_policy: dict[str, tuple[HttpRule, ...]]) -> dict[str, ChainRule]:
    return {
        f"{policy}/{index:04d}": ChainRule(policy, rule)
        for policy, rules in by_policy.items()
        for index, rule in enumerate(rules)
    }


def _audit_per_route(
    plan: Plan, direction: str, redirects: tuple[PolicyEntry, ...], destinations: tuple[Destination, ...]
) -> dict[str, any_pb2.Any]:
    """The audit verdict of a chain's requests as RBAC shadow rules, one filter per group: the same policies
    as the enforcing filters, built from each entry's audit view (an entry the audit verdict denies has none,
    so its requests match no shadow policy)."""
    views = [view for view in map(audit_view, redirects) if view is not None]
    if direction == INGRESS:
        groups = {INGRESS: _ingress_policies(plan, tuple(views))}
    else:
        groups = {
            EGRESS: _egress_policies(plan, tuple(views)),
            INGRESS: _ingress_policies_for_source(destinations, audit_view),
        }
    per_filter = {}
    for group, policies in groups.items():
        rbac = rbac_pb2.RBAC(
            shadow_rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW, policies=policies),
            shadow_rules_stat_prefix=f"{AUDIT_PREFIX}{group}_",
        )
        per_filter[AUDIT_RBAC[group]] = pack(rbac_pb2.RBACPerRoute(rbac=rbac))
    return per_filter


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _original_destination_cluster() -> cluster_pb2.Cluster:
    # The upstream speaks what the client spoke: HTTP/2 with prior knowledge (gRPC) reaches the backend as
    # HTTP/2, HTTP/1.1 as HTTP/1.1.
    protocol_options = http_protocol_options_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig()
    )
    return cluster_pb2.Cluster(
        name=ORIGINAL_DESTINATION_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=2),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(protocol_options)
        },
    )


def _listener(
    name: str,
    listen_address: str,
    proxy_port: int,
    chains: list[listener_components_pb2.FilterChain],
    original_source_mark: int | None,
) -> listener_pb2.Listener:
    """`original_source_mark`: upstream connections leave from the client pod's own address, so the
    destination's node, which knows a pod only by its address, sees the pod's identity; marked, so this node's
    datapath knows them as Envoy's and sends their replies back to it (DATAPATH.md)."""
    filters = [
        listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.original_dst", typed_config=pack(original_dst_pb2.OriginalDst())
        )
    ]
    if original_source_mark is not None:
        filters.append(
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.original_src",
                typed_config=pack(original_src_pb2.OriginalSrc(mark=original_source_mark)),
            )
        )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            # "::" with ipv4_compat: one socket for both families (IPv4 as mapped addresses, which Envoy
            # matches and logs as plain IPv4).
            socket_address=address_pb2.SocketAddress(
                address=listen_address, port_value=proxy_port, ipv4_compat=listen_address == "::"
            )
        ),
        # IP_TRANSPARENT: the listener answers for the original destination's address.
        transparent=wrappers_pb2.BoolValue(value=True),
        listener_filters=filters,
        filter_chains=chains,
    )


@functools.lru_cache(maxsize=1 << 16)
def _cidr(prefix: str) -> address_pb2.CidrRange:
    """Cached: a message put into another is copied, so the cached one is never changed."""
    address, _, length = prefix.partition("/")
    return address_pb2.CidrRange(address_prefix=address, prefix_len=wrappers_pb2.UInt32Value(value=int(length or 32)))


def _headers_to_log(entries: list[PolicyEntry]) -> tuple[str, ...]:
    """The headers the entries' rules (enforced or audited) name, for the access log; never one that a rule
    compares with a Secret's value: the log would carry the secret of whoever sends it right."""
    rules = [rule for e in entries for rule in (*e.http, *(e.audit.http if e.audit is not None else ()))]
    named = {header.name for rule in rules for header in rule.headers}
    secret = {header.name for rule in rules for header in rule.headers if header.from_secret}
    return tuple(sorted(named - secret))


def _filter_chain(
    name: str,
    prefixes: tuple[str, ...],
    direction: str,
    rbac_filters: list[str],
    header_actions_needed: bool,
    headers_to_log: tuple[str, ...],
) -> listener_components_pb2.FilterChain:
    """The pod's chain, matched on its addresses (both families): as destination for ingress, as source for
    egress."""
    match = listener_components_pb2.FilterChainMatch()
    ranges = match.prefix_ranges if direction == INGRESS else match.source_prefix_ranges
    ranges.extend(_cidr(prefix) for prefix in prefixes)
    deny_all = pack(rbac_pb2.RBAC(rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW)))
    enforce_nothing = pack(rbac_pb2.RBAC())  # an audit or rule filter: its route's shadow rules only report
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name.replace("/", "_"),
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        # Old clients and probes still speak HTTP/1.0; Envoy refuses it (426) unless told otherwise.
        http_protocol_options=protocol_pb2.Http1ProtocolOptions(accept_http_10=True),
        # A header name with an underscore is refused (400): some backends read X_Token as X-Token, which a
        # rule on X-Token would never have seen.
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            headers_with_underscores_action=protocol_pb2.HttpProtocolOptions.REJECT_REQUEST
        ),
        rds=hcm_pb2.Rds(
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
            route_config_name=name,
        ),
        # Transparent: no request ID of Envoy's own, the server's `server` header as it sent it (bench/envoy_options.py
        # measures what each costs).
        generate_request_id=wrappers_pb2.BoolValue(value=False),
        server_header_transformation=hcm_pb2.HttpConnectionManager.PASS_THROUGH,
        # Match the path a backend would act on: `..`, `//` and escaped slashes cannot reach a denied path.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.REJECT_REQUEST,
        access_log=[
            _access_log(name, [g for g, f in AUDIT_RBAC.items() if f in rbac_filters], headers_to_log),
            _hits_log(name, [INGRESS] if direction == INGRESS else [EGRESS, INGRESS]),
        ],
        http_filters=[
            *(
                hcm_pb2.HttpFilter(
                    name=name, typed_config=enforce_nothing if name in ENFORCE_NOTHING_FILTERS else deny_all
                )
                for name in rbac_filters
            ),
            *([header_actions.listener_filter()] if header_actions_needed else []),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(_ROUTER)),
        ],
    )
    return listener_components_pb2.FilterChain(
        name=name,
        filter_chain_match=match,
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
            )
        ],
    )


def _access_log(chain: str, audit_groups: list[str], headers: tuple[str, ...]) -> accesslog_config_pb2.AccessLog:
    """Every request to the agent's access log service (on the xDS socket), flushed every 10 ms: denials and
    errors, forwarded requests while somebody watches, and in an audited chain (`audit_groups`) every request
    the audit verdict would deny; with the `headers` the chain's rules name (`policy impact` replays them)."""
    config = grpc_accesslog_pb2.HttpGrpcAccessLogConfig(
        common_config=grpc_accesslog_pb2.CommonGrpcAccessLogConfig(
            log_name=chain,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)
            ),
            transport_api_version=config_source_pb2.V3,
            buffer_flush_interval=duration_pb2.Duration(nanos=10_000_000),
        ),
        additional_request_headers_to_log=headers,
    )
    # Denials and errors (status >= 400) always; forwarded requests at the runtime percentage the agent sets.
    answered_400_or_more = accesslog_config_pb2.AccessLogFilter(
        status_code_filter=accesslog_config_pb2.StatusCodeFilter(
            comparison=accesslog_config_pb2.ComparisonFilter(
                op=accesslog_config_pb2.ComparisonFilter.GE,
                value=base_pb2.RuntimeUInt32(default_value=400, runtime_key="sidecarless.access_log.min_status"),
            )
        )
    )
    forwarded_sampled = accesslog_config_pb2.AccessLogFilter(
        runtime_filter=accesslog_config_pb2.RuntimeFilter(
            runtime_key=ACCESS_LOG_FORWARDED_KEY,
            percent_sampled=percent_pb2.FractionalPercent(
                numerator=0, denominator=percent_pb2.FractionalPercent.HUNDRED
            ),
            use_independent_randomness=True,
        )
    )
    audit_denied = [
        accesslog_config_pb2.AccessLogFilter(
            metadata_filter=accesslog_config_pb2.MetadataFilter(
                matcher=metadata_pb2.MetadataMatcher(
                    filter=RBAC_METADATA,
                    path=[metadata_pb2.MetadataMatcher.PathSegment(key=audit_result_key(group))],
                    value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact="denied")),
                )
            )
        )
        for group in audit_groups
    ]
    return accesslog_config_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=accesslog_config_pb2.AccessLogFilter(
            or_filter=accesslog_config_pb2.OrFilter(filters=[answered_400_or_more, forwarded_sampled, *audit_denied])
        ),
        typed_config=pack(config),
    )


HITS_STAT = "hits"  # Envoy's counter sidecarless.hits, labelled chain, egress, ingress, details
HITS_STAT_PREFIX = "sidecarless"


def hits_chain_label(chain: str) -> str:
    """A chain as its hit counters name it ("/" is no character of a namespace or pod name, "_" neither)."""
    return chain.replace("/", "_")


def _hits_log(chain: str, groups: list[str]) -> accesslog_config_pb2.AccessLog:
    """Every request counted in Envoy (no I/O: a counter in its stats) by the HTTP rule of each group that
    matched it, as the shadow rules recorded it, and how it ended (`via_upstream`: forwarded)."""
    tags = [stats_pb2.Config.Tag(name="chain", value_format=hits_chain_label(chain))]
    tags += [
        stats_pb2.Config.Tag(
            name=group, value_format=f"%DYNAMIC_METADATA({RBAC_METADATA}:{group}_shadow_effective_policy_id)%"
        )
        for group in groups
    ]
    tags.append(stats_pb2.Config.Tag(name="details", value_format="%RESPONSE_CODE_DETAILS%"))
    config = stats_pb2.Config(
        stat_prefix=HITS_STAT_PREFIX,
        counters=[
            stats_pb2.Config.Counter(
                stat=stats_pb2.Config.Stat(name=HITS_STAT, tags=tags), value_fixed=wrappers_pb2.UInt64Value(value=1)
            )
        ],
    )
    return accesslog_config_pb2.AccessLog(name="envoy.access_loggers.stats", typed_config=pack(config))


def hit_rules(plan: Plan) -> dict[tuple[str, str, str], str]:
    """(chain label, group, shadow rule name) -> the HTTP rule it stands for (HttpRule.origin): how the agent
    reads Envoy's hit counters. Named as `_render_chain` names them."""
    rules: dict[tuple[str, str, str], str] = {}
    for endpoint in plan.endpoints:
        for direction in proxied_directions(endpoint):
            label = hits_chain_label(chain_name(endpoint, direction))
            destinations = _destination_entries(plan, endpoint) if direction == EGRESS else ()
            for group, named in _chain_rules(endpoint, direction, destinations).items():
                rules.update({(label, group, name): named_rule.rule.origin for name, named_rule in named.items()})
    return rules


def audit_result_key(group: str) -> str:
    """Where an audit RBAC filter records its verdict ("allowed" or "denied") in the RBAC dynamic metadata."""
    return f"{AUDIT_PREFIX}{group}_shadow_engine_result"


def _rbac_per_route(policies: dict[str, rbac_config_pb2.Policy], group: str) -> any_pb2.Any:
    # The prefix names where RBAC records the policy that allowed the request: the rule filter reads it.
    rbac = rbac_pb2.RBAC(
        rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW, policies=policies),
        rules_stat_prefix=f"{group}_",
    )
    return pack(rbac_pb2.RBACPerRoute(rbac=rbac))


def _rule_per_route(group: str, rules: dict[str, ChainRule]) -> any_pb2.Any:
    """Shadow rules that only name the HTTP rule a request matched, for the header actions and the hit counts
    (`<group>_shadow_effective_policy_id`). Each says the enforcing policy that allowed the request by its name,
    not again by its peers: a rule for 8,000 prefixes with 10 HTTP rules is not 80,000 principals."""
    allowed_by = f"{group}_enforced_effective_policy_id"
    policies = {}
    for name, (policy, rule) in rules.items():
        allowed = rbac_config_pb2.Permission(
            sourced_metadata=rbac_config_pb2.SourcedMetadata(
                metadata_matcher=metadata_pb2.MetadataMatcher(
                    filter=RBAC_METADATA,
                    path=[metadata_pb2.MetadataMatcher.PathSegment(key=allowed_by)],
                    value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=policy)),
                ),
                metadata_source=rbac_config_pb2.DYNAMIC,
            )
        )
        policies[name] = rbac_config_pb2.Policy(
            principals=[rbac_config_pb2.Principal(any=True)], permissions=[_and([allowed, _request(rule)])]
        )
    rbac = rbac_pb2.RBAC(
        shadow_rules=rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW, policies=policies),
        shadow_rules_stat_prefix=f"{group}_",
    )
    return pack(rbac_pb2.RBACPerRoute(rbac=rbac))


def _route_configuration(
    name: str, per_filter: dict[str, any_pb2.Any], metadata: struct_pb2.Struct | None, direction: str
) -> route_pb2.RouteConfiguration:
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(
            cluster=ORIGINAL_DESTINATION_CLUSTER,
            timeout=duration_pb2.Duration(seconds=0),
            retry_policy=_RETRY_RESET_IDEMPOTENT,
        ),
        typed_per_filter_config=per_filter,
    )
    if metadata is not None:
        route.metadata.filter_metadata[header_actions.FILTER_NAME].CopyFrom(metadata)
    return route_pb2.RouteConfiguration(
        name=name, virtual_hosts=[route_components_pb2.VirtualHost(name=name, domains=["*"], routes=[route])]
    )


# Transparent: no `x-envoy-*` headers added to requests or responses; no statistics per upstream and response
# code that nobody reads (the per-rule hit counters are the access logger's).
_ROUTER = router_pb2.Router(suppress_envoy_headers=True, dynamic_stats=wrappers_pb2.BoolValue(value=False))

# A connection Envoy keeps pooled can be gone when it sends the next request on it: the server closed it when
# its keep-alive timeout ran out at that moment (hypercorn, Node.js: 5 s; the classic 503 "UC" of every proxy),
# or, for egress (upstream from the pod's own address, decided at the destination's node like the pod's own), a
# policy change there moved the port into or out of that node's Envoy. Such a request is sent again once on a
# new connection if its method is idempotent (RFC 9110); any other gets the 503.
# Exact matches, one per method (any one suffices), not a regex: an operator's RE2 program-size limit
# (`re2.max_program_size.error_level`) must never make Envoy reject every route for this.
_RETRY_RESET_IDEMPOTENT = route_components_pb2.RetryPolicy(
    retry_on="reset",
    num_retries=wrappers_pb2.UInt32Value(value=1),
    retriable_request_headers=[
        route_components_pb2.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact=method))
        for method in ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
    ],
)


def _same_requests(entries: tuple[PolicyEntry, ...]) -> dict[str, list[PolicyEntry]]:
    """Redirect entries that differ only in the peer, under one policy name: a rule for 8,000 prefixes is one
    policy with 8,000 principals, its requests built (and matched) once, not 8,000 policies."""
    groups: dict[tuple[str, int, int, tuple[HttpRule, ...], bool], list[PolicyEntry]] = {}
    for entry in entries:
        key = (entry.protocol, entry.low, entry.high, entry.http, entry.peer_identity == ANY_IDENTITY)
        groups.setdefault(key, []).append(entry)
    named = {}
    for group in groups.values():
        name = _policy_name(group[0])
        if len(group) > 1:
            first, rest = name.split(":", 1)
            name = f"{first}+{len(group) - 1}:{rest}"
        named[name] = group
    return named


def _ingress_policies(plan: Plan, redirects: tuple[PolicyEntry, ...]) -> dict[str, rbac_config_pb2.Policy]:
    """Who may send which requests to this pod: one policy per redirected port range and requests, naming its
    peers."""
    return {
        name: rbac_config_pb2.Policy(
            principals=_principals(plan, [entry.peer_identity for entry in group]),
            permissions=[_and([_ports(group[0]), _requests(group[0].http)])],
        )
        for name, group in _same_requests(redirects).items()
    }


def _egress_policies(plan: Plan, redirects: tuple[PolicyEntry, ...]) -> dict[str, rbac_config_pb2.Policy]:
    """Which requests this pod may send where: one policy per redirected port range and requests, naming its
    destinations."""
    policies = {}
    for name, group in _same_requests(redirects).items():
        where: list[rbac_config_pb2.Permission] = []
        if group[0].peer_identity != ANY_IDENTITY:
            destinations = [_permission_addresses(plan.address_set(entry.peer_identity)) for entry in group]
            where = [destinations[0] if len(destinations) == 1 else _or(destinations)]
        policies[name] = rbac_config_pb2.Policy(
            principals=[rbac_config_pb2.Principal(any=True)],
            permissions=[_and([*where, _ports(group[0]), _requests(group[0].http)])],
        )
    return policies


def _destination_entries(plan: Plan, source: EndpointPolicy) -> tuple[Destination, ...]:
    """The ingress L7 entries of this node's pods as the datapath applies them to `source`."""
    return tuple(
        Destination(destination.endpoint.key, destination.endpoint.prefixes, entry)
        for destination in plan.endpoints
        for entry in destination.ingress.effective(source.identity)
        if entry.action == REDIRECT
    )


def _ingress_policies_for_source(
    destinations: tuple[Destination, ...],
    view: Callable[[PolicyEntry], PolicyEntry | None] = lambda entry: entry,
) -> dict[str, rbac_config_pb2.Policy]:
    """The ingress L7 rules of this node's pods as they apply to `source`, for its egress chain: requests to
    a port that pod's ingress sends to the proxy must pass its rules; everything else passes here (the
    kernel already applied L3/L4 ingress policy). `view`: the rules an entry stands for (None: no request
    passes), for the audit verdict."""
    policies: dict[str, rbac_config_pb2.Policy] = {}
    governed: list[rbac_config_pb2.Permission] = []
    any_principal = rbac_config_pb2.Principal(any=True)
    for pod, prefixes, governing in destinations:
        where = _and([_permission_addresses(AddressSet(prefixes)), _ports(governing)])
        governed.append(where)
        entry = view(governing)
        if entry is None:
            continue
        policies[_destination_policy_name(pod, entry)] = rbac_config_pb2.Policy(
            principals=[any_principal], permissions=[_and([where, _requests(entry.http)])]
        )
    ungoverned = rbac_config_pb2.Permission(any=True)
    if governed:
        ungoverned = rbac_config_pb2.Permission(
            not_rule=rbac_config_pb2.Permission(or_rules=rbac_config_pb2.Permission.Set(rules=governed))
        )
    policies["not-governed-by-destination"] = rbac_config_pb2.Policy(
        principals=[any_principal], permissions=[ungoverned]
    )
    return policies


def _destination_policy_name(pod: str, entry: PolicyEntry) -> str:
    """A destination's ingress policy in a source's egress chain (hit_rules reads the same name)."""
    return f"{pod}:{_policy_name(entry)}"


def _policy_name(entry: PolicyEntry) -> str:
    peer = "any" if entry.peer_identity == ANY_IDENTITY else str(entry.peer_identity)
    return f"{peer}:{entry.protocol}:{entry.low}-{entry.high}"


def _and(rules: list[rbac_config_pb2.Permission]) -> rbac_config_pb2.Permission:
    return rbac_config_pb2.Permission(and_rules=rbac_config_pb2.Permission.Set(rules=rules))


def _or(rules: list[rbac_config_pb2.Permission]) -> rbac_config_pb2.Permission:
    return rbac_config_pb2.Permission(or_rules=rbac_config_pb2.Permission.Set(rules=rules))


def _ports(entry: PolicyEntry) -> rbac_config_pb2.Permission:
    if entry.low == entry.high:
        return rbac_config_pb2.Permission(destination_port=entry.low)
    return rbac_config_pb2.Permission(destination_port_range=range_pb2.Int32Range(start=entry.low, end=entry.high + 1))


def _principals(plan: Plan, identities: list[int]) -> list[rbac_config_pb2.Principal]:
    """Any of these peers (RBAC ORs a policy's principals): a peer that is a set of addresses and nothing
    inside them excepted, as its addresses themselves, the common case and the cheapest for Envoy to build and
    match (8,000 prefixes are 8,000 principals, not 24,000 nested ones)."""
    principals = []
    for identity in identities:
        addresses = plan.address_set(identity) if identity != ANY_IDENTITY else None
        if addresses is not None and addresses.include and not addresses.exclude:
            principals += [rbac_config_pb2.Principal(direct_remote_ip=_cidr(prefix)) for prefix in addresses.include]
        else:
            principals.append(_principal(plan, identity))
    return principals


def _principal(plan: Plan, identity: int) -> rbac_config_pb2.Principal:
    """The peer's addresses, matched on the direct remote address: the client as it connected."""
    if identity == ANY_IDENTITY:
        return rbac_config_pb2.Principal(any=True)
    addresses = plan.address_set(identity)
    include = rbac_config_pb2.Principal(
        or_ids=rbac_config_pb2.Principal.Set(
            ids=[rbac_config_pb2.Principal(direct_remote_ip=_cidr(prefix)) for prefix in addresses.include]
        )
    )
    if not addresses.include:
        return rbac_config_pb2.Principal(not_id=rbac_config_pb2.Principal(any=True))
    if not addresses.exclude:
        return include
    exclude = rbac_config_pb2.Principal(
        or_ids=rbac_config_pb2.Principal.Set(
            ids=[rbac_config_pb2.Principal(direct_remote_ip=_cidr(prefix)) for prefix in addresses.exclude]
        )
    )
    return rbac_config_pb2.Principal(
        and_ids=rbac_config_pb2.Principal.Set(ids=[include, rbac_config_pb2.Principal(not_id=exclude)])
    )


def _permission_addresses(addresses: AddressSet) -> rbac_config_pb2.Permission:
    if not addresses.include:
        return rbac_config_pb2.Permission(not_rule=rbac_config_pb2.Permission(any=True))
    include = rbac_config_pb2.Permission(
        or_rules=rbac_config_pb2.Permission.Set(
            rules=[rbac_config_pb2.Permission(destination_ip=_cidr(prefix)) for prefix in addresses.include]
        )
    )
    if not addresses.exclude:
        return include
    exclude = rbac_config_pb2.Permission(
        or_rules=rbac_config_pb2.Permission.Set(
            rules=[rbac_config_pb2.Permission(destination_ip=_cidr(prefix)) for prefix in addresses.exclude]
        )
    )
    return _and([include, rbac_config_pb2.Permission(not_rule=exclude)])


def _requests(rules: tuple[HttpRule, ...]) -> rbac_config_pb2.Permission:
    return rbac_config_pb2.Permission(or_rules=rbac_config_pb2.Permission.Set(rules=[_request(rule) for rule in rules]))


def _request(rule: HttpRule) -> rbac_config_pb2.Permission:
    conditions = []
    if rule.method is not None:
        conditions.append(_header(":method", _full_match(rule.method)))
    if rule.path is not None:
        # url_path is the path without the query string, after normalisation.
        conditions.append(rbac_config_pb2.Permission(url_path=path_pb2.PathMatcher(path=_full_match(rule.path))))
    if rule.host is not None:
        conditions.append(_header(":authority", _full_match(rule.host)))
    for header in rule.headers:
        if header.mismatch is not None:
            continue  # with a mismatch action the rule matches either way; the action is applied later
        if header.value is None:
            conditions.append(
                rbac_config_pb2.Permission(
                    header=route_components_pb2.HeaderMatcher(name=header.name, present_match=True)
                )
            )
        else:
            # Envoy matches a header sent more than once value by value: one matching copy would do. Every
            # copy must match instead, so no copy that the rule would refuse reaches the backend beside it.
            conditions.append(_header(header.name, string_pb2.StringMatcher(exact=header.value)))
            other = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=other_than(header.value)))
            conditions.append(rbac_config_pb2.Permission(not_rule=_header(header.name, other)))
    if not conditions:
        return rbac_config_pb2.Permission(any=True)
    return _and(conditions)


def other_than(value: str) -> str:
    """An RE2 pattern whose full match is every string but `value`, linear in its length: for each position,
    the end of the string there, another character there, or (after the last) anything more."""
    pattern = ".+"
    for character in reversed(value):
        literal = character if character.isascii() and character.isalnum() else f"\\x{{{ord(character):x}}}"
        pattern = f"(?:|[^{literal}].*|{literal}{pattern})"
    return "(?s)" + pattern


# Envoy refuses regular expressions whose RE2 program is larger than this runtime value (default 100). The
# policy's own patterns are held to Envoy's default (policy/schema.py); the patterns render generates for
# header values (other_than: about 18 per character) need more.
REGEX_PROGRAM_SIZE_KEY = "re2.max_program_size.error_level"
GENERATED_REGEX_PROGRAM_SIZE = 20_000


def _header(name: str, matcher: string_pb2.StringMatcher) -> rbac_config_pb2.Permission:
    return rbac_config_pb2.Permission(header=route_components_pb2.HeaderMatcher(name=name, string_match=matcher))


def _full_match(pattern: str) -> string_pb2.StringMatcher:
    # safe_regex matches the whole value (RE2), as Cilium's rules mean.
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))
