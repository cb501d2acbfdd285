"""Hit counts per rule (issue 17), the parts without a kernel or an Envoy: rule positions, the names Envoy counts
under, counter indexes, and the agent's totals (agent/hits.py) with a fake datapath."""

import json
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

from sidecarless.agent.hits import RuleHits
from sidecarless.agent.translate import denied_rules
from sidecarless.observe.metrics import envoy_hit_counters
from sidecarless.policy.model import EGRESS, INGRESS, rule_positions
from sidecarless.policy.plan import Plan
from sidecarless.policy.schema import parse_policy_file
from sidecarless.redirect import maps
from sidecarless.redirect.maps import assign_hit_indexes
from sidecarless.xds.accesslog import HttpLogEntry
from sidecarless.xds.render import RULE_RBAC, hit_rules, hits_chain_label, render
from sidecarless.xds.resources import ROUTE_TYPE
from sidecarless.xds.snapshot import Snapshot
from tests.unit.test_policy_semantics import plan_of

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: production}
specs:
- endpointSelector: {matchLabels: {app: billing-api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: prometheus}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: /metrics}, {method: HEAD}]}
  - fromEndpoints: [{matchLabels: {app: finance-batch}}]
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: []}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: dev-tool}}]
- endpointSelector: {matchLabels: {app: prometheus}}
  egress:
  - toEndpoints: [{matchLabels: {app: billing-api}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{path: "/.*"}]}
"""
PROMETHEUS_IP, BILLING_IP, DEV_TOOL_IP = "10.244.1.11", "10.244.1.10", "10.244.1.13"


def test_every_rule_has_a_position_and_compile_names_each_http_rule_by_it() -> None:
    (policy,) = parse_policy_file("p.yaml", textwrap.dedent(POLICY)).policies
    positions = rule_positions(policy)
    assert positions == [
        ("production/p specs[0].ingress[0]", False),
        ("production/p specs[0].ingress[0].toPorts[0].rules.http[0]", True),
        ("production/p specs[0].ingress[0].toPorts[0].rules.http[1]", True),
        ("production/p specs[0].ingress[1]", False),
        ("production/p specs[0].ingress[1].toPorts[1].rules.http", True),
        ("production/p specs[0].ingressDeny[0]", False),
        ("production/p specs[1].egress[0]", False),
        ("production/p specs[1].egress[0].toPorts[0].rules.http[0]", True),
    ]
    plan = plan_of(POLICY)
    origins = {
        rule.origin
        for endpoint in plan.endpoints
        for direction in (INGRESS, EGRESS)
        for entry in endpoint.direction(direction).entries
        for rule in entry.http
    }
    assert origins == {position for position, http in positions if http}
    entry_origins = {
        origin
        for endpoint in plan.endpoints
        for direction in (INGRESS, EGRESS)
        for entry in endpoint.direction(direction).entries
        for origin in entry.origins
    }
    assert entry_origins == {position for position, http in positions if not http}


def shadow_names(plan: Plan) -> set[tuple[str, str, str]]:
    """The shadow policy names Envoy will record, per chain and side, read from the rendered routes."""
    names = set()
    snapshot = Snapshot.from_resources(render(plan, {INGRESS: 15001, EGRESS: 15002}))
    for chain, resource in snapshot.resources[ROUTE_TYPE].items():
        route = route_pb2.RouteConfiguration()
        resource.body.Unpack(route)
        for group, filter_name in RULE_RBAC.items():
            config = route.virtual_hosts[0].routes[0].typed_per_filter_config.get(filter_name)
            if config is None:
                continue
            per_route = rbac_pb2.RBACPerRoute()
            config.Unpack(per_route)
            assert per_route.rbac.shadow_rules_stat_prefix == f"{group}_"
            names |= {(hits_chain_label(chain), group, name) for name in per_route.rbac.shadow_rules.policies}
    return names


def test_the_names_envoy_counts_under_are_those_the_agent_reads_them_by() -> None:
    plan = plan_of(POLICY)
    rules = hit_rules(plan)
    rendered = shadow_names(plan)
    assert set(rules) == rendered
    assert sorted(rules.values()).count("production/p specs[0].ingress[0].toPorts[0].rules.http[1]") == 2
    ingress = {name: origin for (chain, group, name), origin in rules.items() if chain.startswith("ingress_")}
    assert sorted(ingress.values()) == [
        "production/p specs[0].ingress[0].toPorts[0].rules.http[0]",
        "production/p specs[0].ingress[0].toPorts[0].rules.http[1]",
        "production/p specs[0].ingress[1].toPorts[1].rules.http",
    ]
    # RBAC tries policies in name order: an entry's HTTP rules in the order `policy trace` tries them.
    prometheus = sorted(name for name, origin in ingress.items() if "ingress[0]" in origin)
    assert [ingress[name][-7:] for name in prometheus] == ["http[0]", "http[1]"]


def test_counter_indexes_are_kept_for_the_same_rule_items_and_reused_lowest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = assign_hit_indexes(plan_of(POLICY), {})
    assert sorted(first.values()) == list(range(1, len(first) + 1))
    assert assign_hit_indexes(plan_of(POLICY), first) == first
    fewer = POLICY.replace("  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: dev-tool}}]\n", "")
    kept = assign_hit_indexes(plan_of(fewer), first)
    assert all(first[origins] == index for origins, index in kept.items())
    monkeypatch.setattr(maps, "HITS_MAX", 3)  # indexes 1 and 2 only: the rest is not counted
    values = sorted(assign_hit_indexes(plan_of(POLICY), {}).values())
    assert values[0] == 0 and values[-2:] == [1, 2]


class FakeDatapath:
    """The kernel's hit counters as a dict (the real ones: redirect/bpf.py, tested in the lab)."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int]] = {}

    def hit_counts(self, indexes: Iterable[int]) -> dict[int, tuple[int, int]]:
        return {index: self.slots.get(index, (0, 0)) for index in indexes}

    def reset_hits(self, indexes: Iterable[int]) -> None:
        for index in indexes:
            self.slots[index] = (0, 0)


def test_totals_count_deltas_survive_a_restart_and_a_new_envoy(tmp_path: Path) -> None:
    plan = plan_of(POLICY)
    datapath = FakeDatapath()
    datapath.slots = {1: (40, 40)}  # left by an earlier agent whose file is gone: zeroed when given out
    hits = RuleHits(tmp_path / "hits.json")
    indexes = hits.assign(plan, datapath)  # type: ignore[arg-type]
    assert datapath.slots[1] == (0, 0)
    deny = next(origins for origins in indexes if origins == ("production/p specs[0].ingressDeny[0]",))
    datapath.slots[indexes[deny]] = (0, 3)
    hits.collect_kernel(datapath)  # type: ignore[arg-type]
    label = hits_chain_label("ingress/production/billing-api")
    name, origin = next((key[2], o) for key, o in hit_rules(plan).items() if key[0] == label and o.endswith("[1]"))
    rules = hit_rules(plan)
    hits.collect_envoy({(label, "", name, "via_upstream"): 5, (label, "", name, "rbac_access_denied"): 9}, rules)
    hits.save()

    again = RuleHits(tmp_path / "hits.json")  # a new agent
    assert again.assign(plan, datapath) == indexes  # type: ignore[arg-type]
    datapath.slots[indexes[deny]] = (0, 4)
    again.collect_kernel(datapath)  # type: ignore[arg-type]
    again.collect_envoy({(label, "", name, "via_upstream"): 2}, rules)  # a new Envoy counts from zero
    totals = again.totals
    assert totals["production/p specs[0].ingressDeny[0]"].flows_denied == 4
    assert totals[origin].requests_allowed == 7
    rows = {row["rule"]: row for row in again.rows(parse_policy_file("p.yaml", textwrap.dedent(POLICY)).policies)}
    assert rows["specs[0].ingressDeny[0]"]["flows_denied"] == 4
    assert rows["specs[1].egress[0]"]["last_hit"] is None


def test_a_damaged_totals_file_starts_the_counts_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "hits.json"
    path.write_text(json.dumps({"since": 1, "totals": {"x": {"unknown": 1}}}))
    hits = RuleHits(path)
    assert hits.totals == {} and hits.since > 1
    assert "hit counts not read" in caplog.text


def test_envoys_counters_are_read_from_its_prometheus_exposition() -> None:
    text = (
        "# TYPE envoy_sidecarless_hits counter\n"
        'envoy_sidecarless_hits{chain="ingress_shop_api",ingress="7:TCP:8080-8080/0001",details="via_upstream"} 3\n'
        'envoy_sidecarless_hits{chain="egress_shop_c",egress="-",ingress="-",details="rbac_access_denied"} 1\n'
        "envoy_other 5\n"
    )
    assert envoy_hit_counters(text) == {
        ("ingress_shop_api", "", "7:TCP:8080-8080/0001", "via_upstream"): 3,
        ("egress_shop_c", "-", "-", "rbac_access_denied"): 1,
    }


def entry(log_name: str, client: str, destination: str, matched: tuple[tuple[str, str], ...]) -> HttpLogEntry:
    return HttpLogEntry(log_name, 0.0, client, 40000, destination, 8080, "POST", "/x", 403,
                        "rbac_access_denied_matched_policy[none]", 0.1, matched=matched)  # fmt: skip


def test_a_denied_request_counts_on_the_rule_items_of_the_sides_no_http_rule_let_it_through() -> None:
    plan = plan_of(POLICY)
    ingress = entry("ingress/production/billing-api", PROMETHEUS_IP, BILLING_IP, ())
    assert denied_rules(ingress, plan, ()) == ("production/p specs[0].ingress[0]",)
    # Through prometheus' egress chain: its own rule let it through, the destination's did not.
    egress = entry("egress/production/prometheus", PROMETHEUS_IP, BILLING_IP, (("egress", "x"),))
    assert denied_rules(egress, plan, ()) == ("production/p specs[0].ingress[0]",)
    both = entry("egress/production/prometheus", PROMETHEUS_IP, BILLING_IP, ())
    assert denied_rules(both, plan, ()) == ("production/p specs[1].egress[0]", "production/p specs[0].ingress[0]")
    backend = HttpLogEntry("ingress/production/billing-api", 0.0, PROMETHEUS_IP, 1, BILLING_IP, 8080, "GET", "/",
                           403, "via_upstream", 0.1)  # fmt: skip
    assert denied_rules(backend, plan, ()) == ()  # the backend's own 403 is no policy's


def test_a_removed_rules_last_flows_are_counted_before_its_counter_is_given_to_another(tmp_path: Path) -> None:
    datapath = FakeDatapath()
    hits = RuleHits(tmp_path / "hits.json")
    indexes = hits.assign(plan_of(POLICY), datapath)  # type: ignore[arg-type]
    deny = ("production/p specs[0].ingressDeny[0]",)
    datapath.slots[indexes[deny]] = (0, 5)  # counted since the last collection
    without_deny = POLICY.replace("  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: dev-tool}}]\n", "")
    hits.assign(plan_of(without_deny), datapath)  # type: ignore[arg-type]
    assert hits.totals[deny[0]].flows_denied == 5
    added = POLICY.replace("app: dev-tool", "app: other-api")  # new rule items: a counter that starts at zero
    reassigned = hits.assign(plan_of(added), datapath)  # type: ignore[arg-type]
    newcomer = next(index for origins, index in reassigned.items() if origins == deny)
    assert newcomer == indexes[deny] and datapath.slots[newcomer] == (0, 0)
