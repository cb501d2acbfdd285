"""Differential test: generated policies and requests through `policy trace` and through the lab datapath.

Hypothesis generates policy sets over the shared lab world (tests/scenarios/pods.yaml) and requests between
its pods and external hosts, over IPv4 or IPv6 (drawn; the pods are dual-stack, each external host has one
family); every verdict of the real kernel and Envoy must equal the offline one. A fixed seed keeps CI
repeatable: 20 policy sets x 10 requests = 200 cases per run.
"""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from sidecarless.lab.node import Lab
from sidecarless.lab.pods import endpoints_of, node_addresses, parse_pods, place
from sidecarless.lab.scenario import Case, offline_outcome, run_case
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Node
from sidecarless.sources.files import PolicyDirectory
from tests.e2e.conftest import lab_name

WORLD = Path(__file__).resolve().parents[1] / "scenarios" / "pods.yaml"
POLICY_SETS = 20
REQUESTS_PER_SET = 10
DROP_TIMEOUT_S = 0.8

SUBJECTS = [{"app": "api"}, {"app": "web"}, {"tier": "backend"}, {"app": "client"}, {"app": "batch"}]
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
        if l7_ok and draw(st.booleans()):
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
            if draw(st.floats(0, 1)) < weights[section]:
                spec[section] = draw(st.lists(rule_item(egress, deny), min_size=0, max_size=3))
        if draw(st.floats(0, 1)) < 0.1:
            spec["enableDefaultDeny"] = {"ingress": False}
        policies.append(
            {
                "apiVersion": "cilium.io/v2",
                "kind": "CiliumNetworkPolicy",
                "metadata": {"name": f"generated-{index}", "namespace": "shop"},
                "spec": spec,
            }
        )
    return policies


@st.composite
def request(draw: st.DrawFn, index: int) -> Case:
    source = draw(st.sampled_from(["client", "batch", "web", "monitor", "internet", "partner", "internet6"]))
    destination = draw(st.sampled_from(["api", "web", "internet", "internet6"]))
    if {source, destination} & {"internet", "partner"} and "internet6" in {source, destination}:
        destination = draw(st.sampled_from(["api", "web"]))  # an IPv4 host and an IPv6 one share no family
    ends = {source, destination}
    if ends & {"internet", "partner"}:  # IPv4 hosts
        family = 4
    elif "internet6" in ends:
        family = 6
    else:
        family = draw(st.sampled_from([4, 6]))
    if destination == "api" and draw(st.floats(0, 1)) < 0.25:
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


@seed(20261126)
@settings(
    max_examples=POLICY_SETS,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # a shrink would re-run the lab for minutes; the report shows the example
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(policies=policy_set(), data=st.data())
def test_trace_agrees_with_the_datapath(
    world_lab: Lab,
    tmp_path_factory: pytest.TempPathFactory,
    policies: list[dict[str, object]],
    data: st.DataObject,
) -> None:
    directory = tmp_path_factory.mktemp("generated")
    (directory / "policies.yaml").write_text(yaml.safe_dump_all(policies, sort_keys=False))
    requests = [data.draw(request(index)) for index in range(REQUESTS_PER_SET)]

    assert world_lab.apply(directory) == []
    placements = place(parse_pods(str(WORLD), WORLD.read_text()))
    policy_set_read = PolicyDirectory(directory).read_if_changed()
    assert policy_set_read is not None
    plan = compile_plan(policy_set_read.policies, endpoints_of(placements), Node(ips=node_addresses(placements)))
    expected = [offline_outcome(plan, placements, case).observed for case in requests]

    with ThreadPoolExecutor(max_workers=REQUESTS_PER_SET) as pool:
        observed = list(pool.map(lambda case: run_case(world_lab, case, DROP_TIMEOUT_S).observed, requests))
    mismatches = [
        f"{case.source} -> {case.destination}:{case.port} IPv{case.family} {case.proto} {case.method} {case.path}: "
        f"trace {want}, datapath {got}"
        for case, want, got in zip(requests, expected, observed, strict=True)
        if want != got
    ]
    assert not mismatches, "\n".join(mismatches) + "\n\n" + yaml.safe_dump_all(policies, sort_keys=False)
