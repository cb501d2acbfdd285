"""Differential test: generated policies and requests through `policy trace` and through the lab datapath.

Hypothesis generates policy sets over the shared lab world (tests/scenarios/pods.yaml) and requests between
its pods and external hosts, over IPv4 or IPv6 (drawn; the pods are dual-stack, each external host has one
family); every verdict of the real kernel and Envoy must equal the offline one. A fixed seed keeps CI
repeatable: 20 policy sets x 10 requests = 200 cases per run.

Some generated policies are in audit mode (issue 17): the verdicts must be those of the others, and the audit
events the monitor shows must be exactly where the trace's audit verdict differs: in the kernel where one of
the two drops the flow and the other does not, in Envoy where neither drops it and one lets the request
through.
"""

import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from sidecarless.api.client import agent_status
from sidecarless.lab.node import Lab
from sidecarless.lab.pods import Placement, endpoints_of, node_addresses, parse_pods, place
from sidecarless.lab.scenario import Case, offline_outcome, offline_trace, run_case
from sidecarless.observe.events import peer_of
from sidecarless.observe.impact import PROXY
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Node, enforced_policies
from sidecarless.policy.plan import Plan
from sidecarless.policy.trace import DROPPED
from sidecarless.sources.files import PolicyDirectory
from tests.e2e.conftest import CLI, Monitor, lab_name, wait_until

WORLD = Path(__file__).resolve().parents[1] / "scenarios" / "pods.yaml"
POLICY_SETS = 20
REQUESTS_PER_SET = 10
L7_POLICY_SETS = 12
IMPACT_POLICY_SETS = 8
IMPACT_FLIPS_COMPARED: Counter[str] = Counter()
# How many audit events the generated cases expected, over the module: the audit half must compare something.
AUDIT_EVENTS_EXPECTED: Counter[str] = Counter()
DROP_TIMEOUT_S = 0.8
AUDITED_IN_TEN = 4
AUDIT_ANNOTATION = {"policy.sidecarless.io/audit": "true"}

# api twice: the pod with the L7 ports, which most requests reach.
SUBJECTS = [{"app": "api"}, {"app": "api"}, {"app": "web"}, {"tier": "backend"}, {"app": "client"}, {"app": "batch"}]
PEERS = [
    {"fromEndpoints": [{"matchLabels": {"app": "client"}}]},
    {"fromEndpoints": [{"matchLabels": {"app": "batch"}}]},
    {"fromEndpoints": [{"matchLabels": {"app": "client", "k8s:io.kubernetes.pod.namespace": "ops"}}]},
    {"fromEndpoints": [{"matchExpressions": [{"key": "tier", "operator": "Exists"}]}]},
    {"fromEndpoints": [{}]},
    {"fromEntities": ["world"]},
    {"fromEntities": ["cluster"]},
    {"fromCIDR": ["198.51.100.0/24"]},
    {"fromCIDR": ["2001:db8:10::/48"]},
    {"fromCIDR": ["::/0"]},  # world-ipv6: an IPv6 address no other identity holds
    {"fromCIDR": ["0.0.0.0/0"]},
    {"fromCIDRSet": [{"cidr": "2001:db8::/32", "except": ["2001:db8:10::/48"]}]},
    {},
]
PORTS = [
    [{"port": "8080", "protocol": "TCP"}],
    [{"port": "9000", "protocol": "TCP"}],
    [{"port": "8000", "endPort": 9999, "protocol": "TCP"}],
    [{"port": "http", "protocol": "TCP"}],
    [{"port": "5432", "protocol": "TCP"}],
    [{"port": "5432", "protocol": "ANY"}],
]
HTTP_RULES = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "method": st.sampled_from(["GET", "POST", "GET|HEAD"]),
            "path": st.sampled_from(["/a", "/a.*", "/b", "/(a|b)/c"]),
        },
    ),
    min_size=0,
    max_size=2,
)


METHODS = st.sampled_from(["GET", "POST", "GET|HEAD"])
PATHS = st.sampled_from(["/a", "/a.*", "/b", "/(a|b)/c"])
# Rules that let some requests through and not others.
NARROW_HTTP_RULES = st.lists(
    st.one_of(
        st.fixed_dictionaries({"method": METHODS}),
        st.fixed_dictionaries({"path": PATHS}),
        st.fixed_dictionaries({"method": METHODS, "path": PATHS}),
    ),
    min_size=1,
    max_size=2,
)


@st.composite
def rule_item(draw: st.DrawFn, egress: bool, deny: bool) -> dict[str, object]:
    peer = dict(draw(st.sampled_from(PEERS)))
    if egress:
        peer = {key.replace("from", "to"): value for key, value in peer.items()}
        if "toEndpoints" in peer:
            peer["toEndpoints"] = draw(
                st.sampled_from([[{"matchLabels": {"app": "api"}}], [{"matchLabels": {"tier": "frontend"}}], [{}]])
            )
    if draw(st.booleans()) or not peer:
        ports = draw(st.sampled_from(PORTS))
        port_rule: dict[str, object] = {"ports": ports}
        l7_ok = not deny and ports[0]["protocol"] == "TCP" and ports[0]["port"] != "5432"
        if l7_ok and draw(st.integers(1, 3)) > 1:
            port_rule["rules"] = {"http": draw(HTTP_RULES)}
        peer["toPorts"] = [port_rule]
    return peer


@st.composite
def policy_set(draw: st.DrawFn) -> list[dict[str, object]]:
    policies = []
    for index in range(draw(st.integers(1, 3))):
        spec: dict[str, object] = {"endpointSelector": {"matchLabels": draw(st.sampled_from(SUBJECTS))}}
        for section, egress, deny in (
            ("ingress", False, False),
            ("egress", True, False),
            ("ingressDeny", False, True),
        ):
            weights = {"ingress": 0.8, "egress": 0.35, "ingressDeny": 0.15}
            if draw(st.integers(1, 100)) <= weights[section] * 100:
                spec[section] = draw(st.lists(rule_item(egress, deny), min_size=1, max_size=3))
        if draw(st.integers(1, 10)) == 1:
            spec["enableDefaultDeny"] = {"ingress": False}
        metadata: dict[str, object] = {"name": f"generated-{index}", "namespace": "shop"}
        if draw(st.integers(1, 10)) <= AUDITED_IN_TEN:
            metadata["annotations"] = AUDIT_ANNOTATION
        policies.append(
            {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": metadata, "spec": spec}
        )
    return policies


@st.composite
def request(draw: st.DrawFn, index: int) -> Case:
    source = draw(st.sampled_from(["client", "batch", "web", "monitor", "internet", "partner", "internet6"]))
    # api twice: the pod most subjects select, with the L7 ports.
    destination = draw(st.sampled_from(["api", "api", "web", "internet", "internet6"]))
    if {source, destination} & {"internet", "partner"} and "internet6" in {source, destination}:
        destination = draw(st.sampled_from(["api", "web"]))  # an IPv4 host and an IPv6 one share no family
    ends = {source, destination}
    if ends & {"internet", "partner"}:  # IPv4 hosts
        family = 4
    elif "internet6" in ends:
        family = 6
    else:
        family = draw(st.sampled_from([4, 6]))
    if destination == "api" and draw(st.integers(1, 4)) == 1:
        return Case(f"r{index}", source, destination, 5432, "connects", proto="tcp", family=family)
    port = 9000 if destination == "api" and draw(st.booleans()) else 8080
    method = draw(st.sampled_from(["GET", "POST", "HEAD"]))
    path = draw(st.sampled_from(["/a", "/a/x", "/b", "/b/c", "/c", "/a/../b"]))
    return Case(f"r{index}", source, destination, port, "200", method=method, path=path, family=family)


@pytest.fixture(scope="module")
def world_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(lab_name("diff"))
    empty = tmp_path_factory.mktemp("no-policies")
    try:
        lab.up(WORLD, empty)
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def monitor(world_lab: Lab) -> Iterator[Monitor]:
    watching = Monitor(world_lab, "--type", "audit")
    wait_until(lambda: agent_status(world_lab.agent_socket)["monitors"] == 1, "the monitor to connect")
    yield watching
    watching.stop()


FlowKey = tuple[str, str, int]  # source address, destination address, port


def flow_key(placements: list[Placement], case: Case) -> FlowKey:
    """The addresses a case's flow carries, as audit events name them."""
    by_name = {placement.pod.name: placement for placement in placements}

    def address(name: str) -> str:
        placement = by_name[name]
        return placement.ip6 if (case.family == 6 and placement.ip6) or not placement.ip else placement.ip

    return address(case.source), address(case.destination), case.port


def expected_audit_events(
    enforced: Plan, audit: Plan, placements: list[Placement], cases: list[Case]
) -> tuple[set[FlowKey], Counter[tuple[FlowKey, str]]]:
    """The flows the kernel reports (one verdict drops, the other does not), and per flow and method how many
    requests Envoy reports (neither drops it; one lets the request through, the other does not)."""
    kernel: set[FlowKey] = set()
    requests: Counter[tuple[FlowKey, str]] = Counter()
    for case in cases:
        now, then = offline_trace(enforced, placements, case), offline_trace(audit, placements, case)
        key = flow_key(placements, case)
        if (now.verdict == DROPPED) != (then.verdict == DROPPED):
            kernel.add(key)
            AUDIT_EVENTS_EXPECTED["kernel"] += 1
        elif now.verdict != DROPPED and now.passes != then.passes and case.proto == "http":
            requests[(key, case.method)] += 1
            AUDIT_EVENTS_EXPECTED["l7, would deny" if now.passes else "l7, would let through"] += 1
    return kernel, requests


def observed_audit_events(
    events: list[dict[str, object]],
) -> tuple[set[FlowKey], Counter[tuple[FlowKey, str]]]:
    kernel: set[FlowKey] = set()
    requests: Counter[tuple[FlowKey, str]] = Counter()
    for event in events:
        source, destination = event["source"], event["destination"]
        assert isinstance(source, dict) and isinstance(destination, dict)
        key = (str(source["ip"]), str(destination["ip"]), int(destination["port"]))
        if event["method"]:
            requests[(key, str(event["method"]))] += 1
        else:
            kernel.add(key)
    return kernel, requests


SETTINGS = settings(
    deadline=None,
    database=None,
    phases=[Phase.generate],  # a shrink would re-run the lab for minutes; the report shows the example
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@seed(20261126)
@settings(SETTINGS, max_examples=POLICY_SETS)
@given(policies=policy_set(), data=st.data())
def test_trace_agrees_with_the_datapath(
    world_lab: Lab,
    monitor: Monitor,
    tmp_path_factory: pytest.TempPathFactory,
    policies: list[dict[str, object]],
    data: st.DataObject,
) -> None:
    requests = [data.draw(request(index)) for index in range(REQUESTS_PER_SET)]
    check(world_lab, monitor, tmp_path_factory, policies, requests)


@st.composite
def l7_policy_set(draw: st.DrawFn) -> list[dict[str, object]]:
    """Policies on api's HTTP port alone, some in audit mode: what Envoy's audit verdicts are made of. The
    first is mostly enforced, the others mostly audited: an audited policy beside an enforced one tightens or
    loosens it."""
    policies = []
    for index in range(draw(st.integers(1, 3))):
        items = []
        for _ in range(draw(st.integers(1, 2))):
            port_rule: dict[str, object] = {"ports": [{"port": "8080", "protocol": "TCP"}]}
            if draw(st.integers(1, 4)) > 1:
                port_rule["rules"] = {"http": draw(NARROW_HTTP_RULES)}
            items.append({**draw(st.sampled_from(PEERS[:5])), "toPorts": [port_rule]})
        metadata: dict[str, object] = {"name": f"l7-{index}", "namespace": "shop"}
        if draw(st.integers(1, 3)) > (2 if index == 0 else 1):
            metadata["annotations"] = AUDIT_ANNOTATION
        spec = {"endpointSelector": {"matchLabels": {"app": "api"}}, "ingress": items}
        policies.append(
            {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": metadata, "spec": spec}
        )
    return policies


@st.composite
def l7_request(draw: st.DrawFn, index: int) -> Case:
    source = draw(st.sampled_from(["client", "batch", "web", "monitor"]))
    method = draw(st.sampled_from(["GET", "POST", "HEAD"]))
    path = draw(st.sampled_from(["/a", "/a/x", "/b", "/b/c", "/c"]))
    family = draw(st.sampled_from([4, 6]))
    return Case(f"r{index}", source, "api", 8080, "200", method=method, path=path, family=family)


@seed(20261203)
@settings(SETTINGS, max_examples=L7_POLICY_SETS)
@given(policies=l7_policy_set(), data=st.data())
def test_audit_verdicts_of_requests_agree_with_the_trace(
    world_lab: Lab,
    monitor: Monitor,
    tmp_path_factory: pytest.TempPathFactory,
    policies: list[dict[str, object]],
    data: st.DataObject,
) -> None:
    requests = [data.draw(l7_request(index)) for index in range(REQUESTS_PER_SET)]
    check(world_lab, monitor, tmp_path_factory, policies, requests)


def check(
    lab: Lab,
    monitor: Monitor,
    tmp_path_factory: pytest.TempPathFactory,
    policies: list[dict[str, object]],
    requests: list[Case],
) -> None:
    """The verdicts of `requests` under `policies` in the lab are those `policy trace` gives, and the audit
    events exactly those its audit verdicts make."""
    directory = tmp_path_factory.mktemp("generated")
    (directory / "policies.yaml").write_text(yaml.safe_dump_all(policies, sort_keys=False))
    assert lab.apply(directory) == []
    placements = place(parse_pods(str(WORLD), WORLD.read_text()))
    policy_set_read = PolicyDirectory(directory).read_if_changed()
    assert policy_set_read is not None
    every = policy_set_read.policies
    endpoints, node = endpoints_of(placements), Node(ips=node_addresses(placements))
    plan = compile_plan(enforced_policies(every), endpoints, node, population_policies=every)
    audit_plan = compile_plan(every, endpoints, node)
    expected = [offline_outcome(plan, placements, case).observed for case in requests]
    expected_kernel, expected_requests = expected_audit_events(plan, audit_plan, placements, requests)

    monitor.events.clear()
    with ThreadPoolExecutor(max_workers=REQUESTS_PER_SET) as pool:
        observed = list(pool.map(lambda case: run_case(lab, case, DROP_TIMEOUT_S).observed, requests))
    mismatches = [
        f"{case.source} -> {case.destination}:{case.port} IPv{case.family} {case.proto} {case.method} {case.path}: "
        f"trace {want}, datapath {got}"
        for case, want, got in zip(requests, expected, observed, strict=True)
        if want != got
    ]
    policies_text = "\n\n" + yaml.safe_dump_all(policies, sort_keys=False)
    assert not mismatches, "\n".join(mismatches) + policies_text

    def audited() -> tuple[set[FlowKey], Counter[tuple[FlowKey, str]]]:
        return observed_audit_events([event for _, event in list(monitor.events)])

    def arrived() -> bool:
        kernel, requests = audited()
        return kernel >= expected_kernel and sum(requests.values()) >= sum(expected_requests.values())

    wait_until(arrived, "the audit events", 5.0)
    assert audited() == (expected_kernel, expected_requests), policies_text


@seed(20261204)
@settings(SETTINGS, max_examples=IMPACT_POLICY_SETS)
@given(current=policy_set(), proposed=policy_set(), data=st.data())
def test_the_impact_preview_predicts_every_flip_and_no_other(
    world_lab: Lab,
    tmp_path_factory: pytest.TempPathFactory,
    current: list[dict[str, object]],
    proposed: list[dict[str, object]],
    data: st.DataObject,
) -> None:
    """Traffic recorded with `monitor -o json` under one generated policy set, previewed with `policy impact`
    against another, which is then applied and the same traffic replayed: the flips the preview predicts are
    exactly those that happen (a flow it says will go to the proxy, its requests unrecorded, is left out)."""
    requests = [data.draw(request(index)) for index in range(REQUESTS_PER_SET)]
    placements = place(parse_pods(str(WORLD), WORLD.read_text()))
    directories = []
    for name, policies in (("current", current), ("proposed", proposed)):
        directory = tmp_path_factory.mktemp(name)
        (directory / "policies.yaml").write_text(yaml.safe_dump_all(policies, sort_keys=False))
        directories.append(directory)
    policies_text = "\n".join(yaml.safe_dump_all(p, sort_keys=False) for p in (current, proposed))

    assert world_lab.apply(directories[0]) == []
    watching = int(agent_status(world_lab.agent_socket)["monitors"])
    recorder = Monitor(world_lab)
    wait_until(lambda: agent_status(world_lab.agent_socket)["monitors"] > watching, "the recorder to connect")
    before = run_cases(world_lab, requests)
    pods = {p.pod.name for p in placements if p.pod.external_ip is None}
    # Between two external hosts no pod's policy decides anything, and nothing is recorded.
    keys = {flow_key(placements, case) for case in requests if {case.source, case.destination} & pods}
    wait_until(lambda: keys <= recorded_flows(recorder), "every flow recorded", 10.0)
    recorder.stop()
    flows = tmp_path_factory.mktemp("flows") / "flows.jsonl"
    flows.write_text("".join(json.dumps(event) + "\n" for _, event in recorder.events))

    command = [*CLI, "policy", "impact", "--lab", world_lab.name, "--flows", str(flows), "-o", "json"]
    preview = subprocess.run([*command, "--policies", str(directories[1])], capture_output=True, text=True, timeout=60)
    assert preview.returncode in (0, 1), preview.stderr
    flips = json.loads(preview.stdout)["flips"]
    assert preview.returncode == (1 if flips else 0)
    assert world_lab.apply(directories[1]) == []
    after = run_cases(world_lab, requests)

    every = PolicyDirectory(directories[0]).read_if_changed()
    assert every is not None
    endpoints, node = endpoints_of(placements), Node(ips=node_addresses(placements))
    plan = compile_plan(enforced_policies(every.policies), endpoints, node, population_policies=every.policies)
    to_proxy = {(f["from"], f["to"], f["port"]) for f in flips if PROXY in (f["before"], f["after"])}
    predicted = {
        (f["from"], f["to"], f["port"], f["method"], passes(f["before"]), passes(f["after"]))
        for f in flips
        if PROXY not in (f["before"], f["after"])
    }
    happened = set()
    for case, was, now in zip(requests, before, after, strict=True):
        source, destination, port = flow_key(placements, case)
        names = (peer_of(plan, node.ips, source, 0).name, peer_of(plan, node.ips, destination, 0).name, port)
        proxied = case.proto == "http" and offline_trace(plan, placements, case).proxied
        if not proxied and names in to_proxy:
            continue
        if outcome_passes(was) != outcome_passes(now):
            happened.add((*names, case.method if proxied else "", outcome_passes(was), outcome_passes(now)))
    assert predicted == happened, f"preview: {flips}\n{policies_text}"
    IMPACT_FLIPS_COMPARED.update(predicted=len(predicted))


def run_cases(lab: Lab, cases: list[Case]) -> list[str]:
    with ThreadPoolExecutor(max_workers=REQUESTS_PER_SET) as pool:
        return list(pool.map(lambda case: run_case(lab, case, DROP_TIMEOUT_S).observed, cases))


def recorded_flows(recorder: Monitor) -> set[FlowKey]:
    flows = set()
    for _, event in list(recorder.events):
        source, destination = event["source"], event["destination"]
        assert isinstance(source, dict) and isinstance(destination, dict)
        flows.add((str(source["ip"]), str(destination["ip"]), int(destination["port"])))
    return flows


def passes(verdict: str) -> bool:
    return verdict in ("allowed", "forwarded")


def outcome_passes(observed: str) -> bool:
    return observed in ("200", "connects")


def test_the_impact_previews_predicted_flips() -> None:
    """Runs after the test above: its previews predicted something."""
    assert IMPACT_FLIPS_COMPARED["predicted"] > 0, IMPACT_FLIPS_COMPARED


def test_the_generated_cases_made_audit_events_of_both_kinds() -> None:
    """Runs after the two above (file order): they compared audit events of every kind."""
    kinds = ("kernel", "l7, would deny", "l7, would let through")
    assert all(AUDIT_EVENTS_EXPECTED[kind] > 0 for kind in kinds), AUDIT_EVENTS_EXPECTED
    print(f"audit events compared: {dict(AUDIT_EVENTS_EXPECTED)}")
