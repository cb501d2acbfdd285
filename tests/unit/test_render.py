from dataclasses import replace

import re2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecarless.policy.model import EGRESS, INGRESS
from sidecarless.policy.ports import MAX_HEADER_VALUE
from sidecarless.redirect.maps import (
    ACTION_ALLOW,
    ACTION_PROXY_UNAVAILABLE,
    ACTION_REDIRECT,
    InterfaceValue,
    PolicyKey,
    PolicyValue,
    address_bytes,
    address_text,
    endpoint_ids,
    interface_value_bytes,
    interface_value_of,
    ipcache_key_bytes,
    ipcache_prefix,
    policy_key_bytes,
    policy_key_of,
    port_blocks,
    redirect_key,
    render_maps,
)
from sidecarless.xds.render import (
    EGRESS_RBAC,
    GENERATED_REGEX_PROGRAM_SIZE,
    INGRESS_RBAC,
    LISTENERS,
    ORIGINAL_DESTINATION_CLUSTER,
    RULE_RBAC,
    other_than,
    render,
)
from sidecarless.xds.resources import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE
from sidecarless.xds.snapshot import Snapshot
from tests.unit.test_policy_semantics import BILLING_HEAD, BILLING_POLICY, plan_of

PORTS = {INGRESS: 15001, EGRESS: 15002}
ROUTE = "ingress/production/billing-api"


def rendered(*texts: str) -> Snapshot:
    return Snapshot.from_resources(render(plan_of(*texts), PORTS))


def test_one_chain_and_one_route_per_proxied_pod() -> None:
    snapshot = rendered(BILLING_POLICY)
    assert list(snapshot.resources[CLUSTER_TYPE]) == [ORIGINAL_DESTINATION_CLUSTER]
    assert list(snapshot.resources[ROUTE_TYPE]) == [ROUTE]
    assert list(snapshot.resources[LISTENER_TYPE]) == [LISTENERS[INGRESS]]
    listener = listener_pb2.Listener()
    snapshot.resources[LISTENER_TYPE][LISTENERS[INGRESS]].body.Unpack(listener)
    assert listener.transparent.value and listener.address.socket_address.port_value == 15001
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
    (chain,) = listener.filter_chains
    assert chain.filter_chain_match.prefix_ranges[0].address_prefix == "10.244.1.10"
    manager = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(manager)
    # Policy lives in RDS, never inline in the listener; the listener's own RBAC allows nothing.
    assert manager.rds.route_config_name == ROUTE
    assert manager.normalize_path.value and manager.merge_slashes
    assert manager.path_with_escaped_slashes_action == hcm_pb2.HttpConnectionManager.REJECT_REQUEST
    # Transparent: no request ID, the server's own `server` header, no x-envoy-* headers, no per-upstream stats.
    assert manager.HasField("generate_request_id") and not manager.generate_request_id.value
    assert manager.server_header_transformation == hcm_pb2.HttpConnectionManager.PASS_THROUGH
    router = router_pb2.Router()
    manager.http_filters[-1].typed_config.Unpack(router)
    assert router.suppress_envoy_headers and router.HasField("dynamic_stats") and not router.dynamic_stats.value
    listener_rbac = rbac_pb2.RBAC()
    manager.http_filters[0].typed_config.Unpack(listener_rbac)
    assert listener_rbac.HasField("rules") and not listener_rbac.rules.policies


def test_route_rbac_always_carries_rules() -> None:
    route = route_pb2.RouteConfiguration()
    rendered(BILLING_POLICY).resources[ROUTE_TYPE][ROUTE].body.Unpack(route)
    per_route = rbac_pb2.RBACPerRoute()
    route.virtual_hosts[0].routes[0].typed_per_filter_config[INGRESS_RBAC].Unpack(per_route)
    assert per_route.rbac.HasField("rules")
    policies = per_route.rbac.rules.policies
    assert len(policies) == 2
    principals = sorted(p.principals[0].direct_remote_ip.address_prefix for p in policies.values())
    assert principals == ["10.244.1.11", "10.244.1.12"]
    for policy in policies.values():
        port, requests = policy.permissions[0].and_rules.rules
        assert port.destination_port == 8080
        method, path = requests.or_rules.rules[0].and_rules.rules
        assert method.header.name == ":method"
        assert path.url_path.path.safe_regex.regex in ("/metrics", "/api/v1/invoices/export")


EGRESS_POLICY = BILLING_HEAD.replace("app: billing-api", "app: prometheus").replace("name: p,", "name: e,") + (
    "  egress:\n  - toEndpoints: [{matchLabels: {app: billing-api}}]\n"
    "    toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{path: '/metrics.*'}]}}]\n"
)


def test_a_rule_for_many_prefixes_says_them_once_however_many_http_rules_it_has() -> None:
    """Issue 19: naming the HTTP rule that matched (hits, header actions) repeated every peer once per rule;
    1,000 rules over 10,000 pods rendered 2.8 MB instead of 0.4 MB."""
    prefixes = [f"172.16.{i // 250}.{i % 250}/32" for i in range(300)]
    rules = "".join(f"        - {{method: GET, path: /r{i}}}\n" for i in range(20))
    text = BILLING_HEAD + (
        f"  ingress:\n  - fromCIDR: [{', '.join(prefixes)}]\n"
        "    toPorts:\n    - ports: [{port: '8080', protocol: TCP}]\n      rules:\n        http:\n" + rules
    )
    route = route_pb2.RouteConfiguration()
    rendered(text).resources[ROUTE_TYPE][ROUTE].body.Unpack(route)
    said = route.SerializeToString().count(b"172.16.")
    assert said == len(prefixes)
    per_route = route.virtual_hosts[0].routes[0].typed_per_filter_config
    named = rbac_pb2.RBACPerRoute()
    per_route[RULE_RBAC[INGRESS]].Unpack(named)
    assert len(named.rbac.shadow_rules.policies) == 20


def test_egress_chain_carries_the_destinations_ingress_rules() -> None:
    snapshot = rendered(BILLING_POLICY, EGRESS_POLICY)
    assert set(snapshot.resources[LISTENER_TYPE]) == {LISTENERS[INGRESS], LISTENERS[EGRESS]}
    route = route_pb2.RouteConfiguration()
    snapshot.resources[ROUTE_TYPE]["egress/production/prometheus"].body.Unpack(route)
    filters = route.virtual_hosts[0].routes[0].typed_per_filter_config
    assert set(filters) == {EGRESS_RBAC, INGRESS_RBAC, RULE_RBAC[EGRESS], RULE_RBAC[INGRESS]}
    ingress = rbac_pb2.RBACPerRoute()
    filters[INGRESS_RBAC].Unpack(ingress)
    assert set(ingress.rbac.rules.policies) == {
        "production/billing-api:58145:TCP:8080-8080".replace("58145", _identity("prometheus")),
        "not-governed-by-destination",
    }
    # The rule filter names the destination's HTTP rule by the enforcing policy that allowed the request.
    named = rbac_pb2.RBACPerRoute()
    filters[RULE_RBAC[INGRESS]].Unpack(named)
    (name,) = named.rbac.shadow_rules.policies
    assert name == f"production/billing-api:{_identity('prometheus')}:TCP:8080-8080/0000"
    allowed_by = (
        named.rbac.shadow_rules.policies[name].permissions[0].and_rules.rules[0].sourced_metadata.metadata_matcher
    )
    assert allowed_by.path[0].key == "ingress_enforced_effective_policy_id"
    assert allowed_by.value.string_match.exact == name.removesuffix("/0000")
    assert ingress.rbac.rules_stat_prefix == "ingress_" and named.rbac.shadow_rules_stat_prefix == "ingress_"


def _identity(pod: str) -> str:
    endpoint = plan_of(BILLING_POLICY).endpoint(pod)
    assert endpoint is not None
    return str(endpoint.identity)


def test_rendering_is_deterministic() -> None:
    first, second = rendered(BILLING_POLICY), rendered(BILLING_POLICY)
    for type_url in (CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE):
        assert first.digests(type_url) == second.digests(type_url)
    changed = rendered(BILLING_POLICY.replace("method: GET", "method: HEAD"))
    assert changed.digests(ROUTE_TYPE) != first.digests(ROUTE_TYPE)
    assert changed.digests(LISTENER_TYPE) == first.digests(LISTENER_TYPE)


def test_no_proxied_port_means_no_listener() -> None:
    snapshot = rendered(BILLING_HEAD + "  ingress: [{toPorts: [{ports: [{port: '5432', protocol: TCP}]}]}]\n")
    assert not snapshot.resources[LISTENER_TYPE] and not snapshot.resources[ROUTE_TYPE]


def test_redirect_entries_only_once_envoy_acked() -> None:
    plan = plan_of(BILLING_POLICY)
    prometheus = int(_identity("prometheus"))
    billing = endpoint_ids(plan)["production/billing-api"]
    key = PolicyKey(billing, prometheus, 0, 6, 8080, 16)
    assert render_maps(plan, PORTS, frozenset()).policy[key] == PolicyValue(ACTION_PROXY_UNAVAILABLE, 0)
    (entry,) = [e for e in plan.endpoint("billing-api").ingress.redirects if e.peer_identity == prometheus]  # type: ignore[union-attr]
    acked = render_maps(plan, PORTS, frozenset({redirect_key("production/billing-api", INGRESS, entry)}))
    assert acked.policy[key] == PolicyValue(ACTION_REDIRECT, 15001)
    assert acked.endpoints["10.244.1.10"].flags == 1 and acked.endpoints["10.244.1.11"].flags == 0
    assert acked.endpoints["10.244.1.10"].id == billing
    l4 = plan_of(BILLING_HEAD + "  ingress: [{toPorts: [{ports: [{port: '5432', protocol: TCP}]}]}]\n")
    assert render_maps(l4, PORTS, frozenset()).policy[PolicyKey(billing, 0, 0, 6, 5432, 16)] == PolicyValue(
        ACTION_ALLOW, 0
    )


def test_endpoint_ids_are_stable_and_distinct() -> None:
    """A pod keeps its id (its policy entries stay in place) when other pods come and go."""
    plan = plan_of(BILLING_POLICY)
    ids = endpoint_ids(plan)
    assert len(set(ids.values())) == len(ids) and 0 not in ids.values()
    fewer = replace(plan, endpoints=tuple(e for e in plan.endpoints if e.endpoint.key != "production/prometheus"))
    assert {pod: ids[pod] for pod in endpoint_ids(fewer)} == endpoint_ids(fewer)


def test_kernel_key_layouts() -> None:
    """The bytes bpf/sidecarless.h lays out: IPv4 mapped into 16 bytes, its prefixes 96 bits longer."""
    assert address_bytes("10.244.1.10") == bytes(10) + b"\xff\xff" + bytes([10, 244, 1, 10])
    assert address_text(address_bytes("10.244.1.10")) == "10.244.1.10"
    assert address_text(address_bytes("fd00:10:244:1::a")) == "fd00:10:244:1::a"
    for prefix in ("10.0.0.0/8", "0.0.0.0/0", "10.244.1.10/32", "2001:db8::/32", "::/0", "fd00::a/128"):
        assert ipcache_prefix(ipcache_key_bytes(prefix)) == prefix
    assert ipcache_key_bytes("10.0.0.0/8")[:4] == (104).to_bytes(4, "little")
    key = PolicyKey(0xDEADBEEF, 12345, 1, 17, 5000, 13)
    data = policy_key_bytes(key)
    assert len(data) == 16 and data[14:] == (5000).to_bytes(2, "big") and policy_key_of(data) == key
    both = InterfaceValue("10.244.1.10", "fd00::a")
    assert len(interface_value_bytes(both, 1)) == 24
    for value in (both, InterfaceValue("10.244.1.10", ""), InterfaceValue("", "fd00::a")):
        assert interface_value_of(interface_value_bytes(value, 1)) == value


def test_port_ranges_become_aligned_prefixes() -> None:
    assert port_blocks(8080, 8080) == [(8080, 16)]
    assert port_blocks(0, 65535) == [(0, 0)]
    assert port_blocks(4096, 8191) == [(4096, 4)]
    blocks = port_blocks(5000, 5500)
    covered = sorted(p for start, bits in blocks for p in range(start, start + (1 << (16 - bits))))
    assert covered == list(range(5000, 5501))


def test_header_actions_named_by_shadow_rules_and_listed_in_route_metadata() -> None:
    from sidecarless.xds.header_actions import FILTER_NAME

    text = BILLING_HEAD + (
        "  ingress:\n  - toPorts:\n    - ports: [{port: '8080', protocol: TCP}]\n      rules:\n        http:\n"
        "        - {path: /a, headerMatches: [{name: X-A, value: '1', mismatch: REPLACE}, {name: X-B, value: '2', mismatch: ADD}]}\n"
        "        - {path: /b}\n"
    )
    snapshot = rendered(text)
    listener = listener_pb2.Listener()
    snapshot.resources[LISTENER_TYPE][LISTENERS[INGRESS]].body.Unpack(listener)
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [f.name for f in manager.http_filters] == [
        INGRESS_RBAC,
        RULE_RBAC[INGRESS],
        FILTER_NAME,
        "envoy.filters.http.router",
    ]
    route = route_pb2.RouteConfiguration()
    snapshot.resources[ROUTE_TYPE][ROUTE].body.Unpack(route)
    rbac = rbac_pb2.RBACPerRoute()
    route.virtual_hosts[0].routes[0].typed_per_filter_config[RULE_RBAC[INGRESS]].Unpack(rbac)
    first, second = sorted(rbac.rbac.shadow_rules.policies)
    assert (first, second) == ("any:TCP:8080-8080/0000", "any:TCP:8080-8080/0001")
    assert rbac.rbac.shadow_rules_stat_prefix == "ingress_"
    actions = route.virtual_hosts[0].routes[0].metadata.filter_metadata[FILTER_NAME]["actions"]
    assert [list(a) for a in actions[first]] == [["REPLACE", "x-a", "1"], ["ADD", "x-b", "2"]]
    assert second not in actions
    # Without actions: no shadow rules, no Lua filter.
    plain = rendered(BILLING_POLICY)
    plain_listener = listener_pb2.Listener()
    plain.resources[LISTENER_TYPE][LISTENERS[INGRESS]].body.Unpack(plain_listener)
    plain_listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert FILTER_NAME not in [f.name for f in manager.http_filters]


def test_snapshots_are_checked_for_consistency() -> None:
    import pytest

    from sidecarless.xds.render import Resources
    from sidecarless.xds.snapshot import InconsistentSnapshot

    resources = render(plan_of(BILLING_POLICY), PORTS)
    without_routes = Resources({**resources.by_type, ROUTE_TYPE: {}})
    with pytest.raises(InconsistentSnapshot, match="uses missing route ingress/production/billing-api"):
        Snapshot.from_resources(without_routes)
    without_clusters = Resources({**resources.by_type, CLUSTER_TYPE: {}})
    with pytest.raises(InconsistentSnapshot, match="uses missing cluster sidecarless/original-destination"):
        Snapshot.from_resources(without_clusters)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12), st.text(max_size=14))
def test_other_than_matches_every_string_but_the_value(value: str, other: str) -> None:
    pattern = other_than(value)
    assert re2.fullmatch(pattern, value) is None
    assert (re2.fullmatch(pattern, other) is not None) == (other != value)
    assert (re2.fullmatch(pattern, value + other) is not None) == (other != "")


def test_other_than_stays_within_envoys_program_size_for_the_longest_value() -> None:
    size = re2.compile(other_than("x" * MAX_HEADER_VALUE)).programsize
    assert size <= GENERATED_REGEX_PROGRAM_SIZE


def test_the_egress_listener_connects_upstream_from_the_client_pods_address() -> None:
    """Another node knows a pod only by its address: the egress listener's upstream connections leave from the
    client's own address, marked so the datapath sends the replies back to Envoy. The ingress listener's do not."""
    plan = plan_of(EGRESS_POLICY)
    snapshot = Snapshot.from_resources(render(plan, PORTS, egress_mark=0xA00))
    filters = {}
    for name, resource in snapshot.resources[LISTENER_TYPE].items():
        listener = listener_pb2.Listener()
        resource.body.Unpack(listener)
        filters[name] = {f.name: f.typed_config for f in listener.listener_filters}
    original_source = original_src_pb2.OriginalSrc()
    filters[LISTENERS[EGRESS]]["envoy.filters.listener.original_src"].Unpack(original_source)
    assert original_source.mark == 0xA00 and not original_source.bind_port
    without_mark = Snapshot.from_resources(render(plan, PORTS))
    listener = listener_pb2.Listener()
    without_mark.resources[LISTENER_TYPE][LISTENERS[EGRESS]].body.Unpack(listener)
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]


def test_routes_retry_a_reset_once_for_idempotent_methods_only() -> None:
    """A pooled upstream connection may be gone when the next request goes on it (the server's keep-alive
    timeout, or for egress a policy change at the destination's node): an idempotent request is sent again
    once, in both directions; a POST is not."""
    snapshot = rendered(BILLING_POLICY, EGRESS_POLICY)
    routes = {}
    for name in ("egress/production/prometheus", ROUTE):
        route = route_pb2.RouteConfiguration()
        snapshot.resources[ROUTE_TYPE][name].body.Unpack(route)
        routes[name] = route.virtual_hosts[0].routes[0].route
    retry = routes["egress/production/prometheus"].retry_policy
    assert (retry.retry_on, retry.num_retries.value) == ("reset", 1)
    # Any one of the headers matching allows the retry: exact methods, no regex (a tight RE2 program-size
    # limit, as the NACK tests set, must not make Envoy reject the routes).
    assert {(m.name, m.string_match.WhichOneof("match_pattern")) for m in retry.retriable_request_headers} == {
        (":method", "exact")
    }
    methods = {m.string_match.exact for m in retry.retriable_request_headers}
    assert methods == {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}
    assert routes[ROUTE].retry_policy == retry
