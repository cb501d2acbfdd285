"""Hit counts per rule (issue 17): a table of cases through the lab, then `policy hits` shows for every rule the
flows (the kernel's counters) and requests (Envoy's) it allowed and denied, exactly; `--unused` exactly the rules
no case exercised. The counts survive an agent restart and a policy change that keeps the rules."""

import json
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecarless.api.client import agent_get
from sidecarless.lab.node import Lab
from sidecarless.lab.pods import endpoints_of, node_addresses, parse_pods, place
from sidecarless.lab.scenario import Case, offline_trace, run_case
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Node
from sidecarless.policy.plan import DENY, Plan
from sidecarless.policy.trace import DENIED, FORWARDED
from sidecarless.sources.files import PolicyDirectory
from tests.e2e.conftest import CLI, lab_name, wait_until, write_policy

WORLD = Path(__file__).resolve().parents[1] / "scenarios" / "pods.yaml"
DROP_TIMEOUT_S = 0.8  # under the first SYN retransmission (1 s): a denied case is one denied flow
POLICIES = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/a.*"}
        - {method: POST, path: /b}
        - {method: PUT}
  - fromEndpoints: [{matchLabels: {app: batch}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - fromEntities: [world]
    toPorts: [{ports: [{port: "9000", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: batch}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-out, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: api}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{path: "/.*"}]}
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
ADDED = """---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
"""
CASES = [
    Case("get", "client", "api", 8080, "200", method="GET", path="/a", family=4),
    Case("get6", "client", "api", 8080, "200", method="GET", path="/a/x", family=6),
    Case("get-again", "client", "api", 8080, "200", method="GET", path="/a", family=4),
    Case("post", "client", "api", 8080, "200", method="POST", path="/b", family=6),
    Case("delete", "client", "api", 8080, "403", method="DELETE", path="/a", family=4),
    Case("post-elsewhere", "client", "api", 8080, "403", method="POST", path="/c", family=4),
    Case("db", "batch", "api", 5432, "connects", proto="tcp", family=4),
    Case("db6", "batch", "api", 5432, "connects", proto="tcp", family=6),
    Case("denied", "batch", "api", 8080, "dropped", family=4),
    Case("web", "client", "web", 8080, "200", family=6),
    Case("other-namespace", "monitor", "api", 8080, "dropped", family=4),
    Case("not-allowed-out", "client", "api", 9000, "dropped", family=4),
]
UNUSED = {
    ("shop/api", "spec.ingress[0].toPorts[0].rules.http[2]"),  # PUT
    ("shop/api", "spec.ingress[2]"),  # from the world
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(lab_name("hits"))
    try:
        lab.up(WORLD, write_policy(tmp_path_factory.mktemp("policies"), "policies.yaml", POLICIES).parent)
        yield lab
    finally:
        lab.down()


def expected_counts(plan: Plan, cases: list[Case]) -> dict[str, Counter[str]]:
    """What each rule should have counted: flows as the kernel decides them (the entries of both ends), requests
    as `policy trace` decides them."""
    placements = place(parse_pods(str(WORLD), WORLD.read_text()))
    counts: dict[str, Counter[str]] = {}

    def add(origins: tuple[str, ...], key: str) -> None:
        for origin in origins:
            counts.setdefault(origin, Counter())[key] += 1

    for case in cases:
        source, destination = plan.endpoint(case.source), plan.endpoint(case.destination)
        assert source is not None and destination is not None
        egress = source.egress.verdict(destination.identity, "TCP", case.port)
        ingress = destination.ingress.verdict(source.identity, "TCP", case.port)
        deny = next((entry for entry in (egress, ingress) if entry is not None and entry.action == DENY), None)
        defaults = (egress is None and source.egress.enforced) or (ingress is None and destination.ingress.enforced)
        if deny is not None:
            add(deny.origins, "flows_denied")
            continue
        if defaults:
            continue
        for entry in (egress, ingress):
            if entry is not None:
                add(entry.origins, "flows_allowed")
        if case.proto == "http":
            result = offline_trace(plan, placements, case)
            if result.verdict == FORWARDED:
                add(result.http_rules, "requests_allowed")
            elif result.verdict == DENIED and result.status == 403:
                add(result.rules, "requests_denied")
    return counts


def policy_hits(lab: Lab, *arguments: str) -> list[dict[str, object]]:
    command = [*CLI, "policy", "hits", "--lab", lab.name, "-o", "json", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    rules: list[dict[str, object]] = json.loads(result.stdout)["rules"]
    return rules


def counted(rows: list[dict[str, object]]) -> dict[str, Counter[str]]:
    keys = ("flows_allowed", "flows_denied", "requests_allowed", "requests_denied")
    counts = {}
    for row in rows:
        values = Counter({key: int(str(row[key])) for key in keys if row[key]})
        if values:
            counts[f"{row['policy']} {row['rule']}"] = values
    return counts


def run(lab: Lab, cases: list[Case]) -> None:
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        outcomes = list(pool.map(lambda case: run_case(lab, case, DROP_TIMEOUT_S), cases))
    failed = [f"{o.case.id}: {o.observed}" for o in outcomes if not o.passed]
    assert not failed, failed


def test_policy_hits_counts_what_a_table_sent_through_each_rule_and_lists_the_unused(lab: Lab) -> None:
    policy_set = PolicyDirectory(lab.policies_dir).read_if_changed()
    assert policy_set is not None
    placements = place(parse_pods(str(WORLD), WORLD.read_text()))
    plan = compile_plan(policy_set.policies, endpoints_of(placements), Node(ips=node_addresses(placements)))
    run(lab, CASES)
    expected = expected_counts(plan, CASES)
    assert sum(c["requests_denied"] for c in expected.values()) == 2  # the table exercises every kind
    assert sum(c["flows_denied"] for c in expected.values()) == 1
    # Denied requests reach the agent's access log within milliseconds; the counters are read when asked.
    wait_until(lambda: counted(policy_hits(lab)) == expected, "the counts", timeout_s=10.0)

    unused = policy_hits(lab, "--unused")
    assert {(str(row["policy"]), str(row["rule"])) for row in unused} == UNUSED
    # The same on /metrics, one series per rule, layer and verdict.
    status, body = agent_get(lab.agent_socket, "/metrics")
    assert status == 200
    series = {
        (s.labels["policy"], s.labels["rule"], s.labels["layer"], s.labels["verdict"]): s.value
        for family in text_string_to_metric_families(body)
        if family.name == "sidecarless_policy_rule_hits"
        for s in family.samples
    }
    assert series[("api", "spec.ingressDeny[0]", "l3l4", "denied")] == 1
    assert series[("api", "spec.ingress[0].toPorts[0].rules.http[0]", "l7", "allowed")] == 3
    assert series[("api", "spec.ingress[0]", "l7", "denied")] == 2

    # An agent restart keeps them: the next agent reads them back, and the pinned and Envoy's counters go on.
    agent = lab.agent_pid()
    assert agent is not None
    os.kill(agent, signal.SIGTERM)
    wait_until(lambda: lab.agent_pid() not in (None, agent), "a new agent", timeout_s=30)
    lab.wait_ready()
    assert counted(policy_hits(lab)) == expected
    more = [CASES[0], CASES[6], CASES[8]]
    run(lab, more)
    for origin, values in expected_counts(plan, more).items():
        expected.setdefault(origin, Counter()).update(values)
    wait_until(lambda: counted(policy_hits(lab)) == expected, "the counts after the restart", timeout_s=10.0)

    # A policy change keeps the counts of the rules it keeps; the new policy's rules start at zero.
    directory = write_policy(Path(lab.dir) / "changed", "policies.yaml", POLICIES + ADDED).parent
    assert lab.apply(directory) == []
    rows = policy_hits(lab)
    assert counted(rows) == expected
    assert {str(row["rule"]) for row in rows if row["policy"] == "shop/web"} == {"spec.ingress[0]"}
