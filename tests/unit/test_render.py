from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from sidecarless.policy.compile import compile_plan
from sidecarless.policy.schema import parse_policy_file
from sidecarless.xds.render import (
    CLUSTER_TYPE,
    INGRESS_LISTENER,
    LISTENER_TYPE,
    ORIGINAL_DESTINATION_CLUSTER,
    RBAC_FILTER,
    ROUTE_TYPE,
    render,
)
from sidecarless.xds.snapshot import Snapshot
from tests.unit.test_compile import ENDPOINTS


def rendered(text: str) -> Snapshot:
    plan = compile_plan(parse_policy_file("p.yaml", text), ENDPOINTS)
    return Snapshot.from_resources(render(plan, 15001))


def test_one_chain_and_one_route_per_proxied_port(billing_policy_text: str) -> None:
    snapshot = rendered(billing_policy_text)
    assert list(snapshot.resources[CLUSTER_TYPE]) == [ORIGINAL_DESTINATION_CLUSTER]
    assert list(snapshot.resources[ROUTE_TYPE]) == ["production/billing-api:8080"]
    listener = listener_pb2.Listener()
    snapshot.resources[LISTENER_TYPE][INGRESS_LISTENER].body.Unpack(listener)
    assert listener.transparent.value
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
    (chain,) = listener.filter_chains
    assert chain.filter_chain_match.destination_port.value == 8080
    assert chain.filter_chain_match.prefix_ranges[0].address_prefix == "10.244.1.10"
    manager = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(manager)
    # Policy lives in RDS, never inline in the listener; the listener's own RBAC allows nothing.
    assert manager.rds.route_config_name == "production/billing-api:8080"
    assert manager.normalize_path.value and manager.merge_slashes
    assert manager.path_with_escaped_slashes_action == hcm_pb2.HttpConnectionManager.REJECT_REQUEST
    listener_rbac = rbac_pb2.RBAC()
    manager.http_filters[0].typed_config.Unpack(listener_rbac)
    assert listener_rbac.HasField("rules") and not listener_rbac.rules.policies


def test_route_rbac_always_carries_rules(billing_policy_text: str) -> None:
    route = route_pb2.RouteConfiguration()
    rendered(billing_policy_text).resources[ROUTE_TYPE]["production/billing-api:8080"].body.Unpack(route)
    per_route = rbac_pb2.RBACPerRoute()
    route.virtual_hosts[0].routes[0].typed_per_filter_config[RBAC_FILTER].Unpack(per_route)
    assert per_route.rbac.HasField("rules")
    policies = per_route.rbac.rules.policies
    assert len(policies) == 2
    principals = sorted(
        p.principals[0].or_ids.ids[0].direct_remote_ip.address_prefix for p in policies.values()
    )
    assert principals == ["10.244.1.11", "10.244.1.12"]
    conditions = policies["allow-0"].permissions[0].or_rules.rules[0].and_rules.rules
    assert conditions[0].header.name == ":method"
    assert conditions[0].header.string_match.safe_regex.regex == "GET"
    assert conditions[1].url_path.path.safe_regex.regex == "/metrics"


def test_rendering_is_deterministic(billing_policy_text: str) -> None:
    first, second = rendered(billing_policy_text), rendered(billing_policy_text)
    for type_url in (CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE):
        assert first.digests(type_url) == second.digests(type_url)
    changed = rendered(billing_policy_text.replace("method: GET", "method: HEAD"))
    assert changed.digests(ROUTE_TYPE) != first.digests(ROUTE_TYPE)
    assert changed.digests(LISTENER_TYPE) == first.digests(LISTENER_TYPE)


def test_no_proxied_port_means_no_listener() -> None:
    text = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l4, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: billing-api}}
  ingress: [{toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
"""
    snapshot = rendered(text)
    assert not snapshot.resources[LISTENER_TYPE] and not snapshot.resources[ROUTE_TYPE]
