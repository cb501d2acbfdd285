"""Compiler and Renderer (incremental) give exactly what a fresh compile and render give, after every change."""

from dataclasses import replace
from pathlib import Path

import pytest

from sidecarless.bench.control_plane import synthetic
from sidecarless.lab.pods import NODE_IP, endpoints_of, parse_pods, place
from sidecarless.lab.scenario import load_scenario
from sidecarless.policy.compile import Compiler, compile_plan
from sidecarless.policy.model import EGRESS, INGRESS, Endpoint, Node, Policy, Secret
from sidecarless.sources.files import PolicyDirectory
from sidecarless.xds.render import Renderer, render
from sidecarless.xds.resources import ROUTE_TYPE, TYPE_ORDER
from sidecarless.xds.snapshot import Snapshot

TESTS = Path(__file__).resolve().parents[1]
TABLES = [
    TESTS.parent / "examples" / "billing-api",
    *sorted(p for p in (TESTS / "scenarios").iterdir() if p.is_dir()),
    *sorted(p for p in (TESTS / "conformance" / "cilium-connectivity").iterdir() if p.is_dir()),
]
PORTS = {INGRESS: 15001, EGRESS: 15002}
NODE = Node(ips=(NODE_IP,))


def _inputs(table: Path) -> tuple[list[Policy], list[Secret], list[Endpoint]]:
    """Every stage's policies at once (stages reuse names: that is one more thing to get right)."""
    scenario = load_scenario(table)
    policies: list[Policy] = []
    secrets: list[Secret] = []
    for directory in sorted({stage.policies or "policies" for stage in scenario.stages}):
        policy_set = PolicyDirectory(table / directory).read_if_changed()
        assert policy_set is not None
        policies += policy_set.policies
        secrets += policy_set.secrets
    pods = parse_pods(str(table / "pods.yaml"), (table / "pods.yaml").read_text())
    return policies, secrets, endpoints_of(place(pods))


def _steps(
    policies: list[Policy], secrets: list[Secret], endpoints: list[Endpoint]
) -> list[tuple[str, list[Policy], list[Secret], list[Endpoint]]]:
    """All of it; each policy removed and put back; a pod relabelled and back; the Secrets gone and back."""
    steps = [("all", policies, secrets, endpoints)]
    for index, policy in enumerate(policies):
        steps.append((f"without {policy.key}", policies[:index] + policies[index + 1 :], secrets, endpoints))
        steps.append(("all", policies, secrets, endpoints))
    relabelled = [replace(endpoints[0], labels=(*endpoints[0].labels, ("relabelled", "yes"))), *endpoints[1:]]
    steps += [("a pod relabelled", policies, secrets, relabelled), ("all", policies, secrets, endpoints)]
    steps += [("no Secrets", policies, [], endpoints), ("all", policies, secrets, endpoints)]
    return steps


@pytest.mark.parametrize("table", TABLES, ids=[p.name for p in TABLES])
def test_incremental_equals_fresh_after_every_change(table: Path) -> None:
    compiler, renderer = Compiler(), Renderer(PORTS)
    # As the agent passes them: the same tuple while the pods do not change (the compiler keeps it sorted).
    as_tuple: dict[int, tuple[Endpoint, ...]] = {}
    for what, policies, secrets, endpoints in _steps(*_inputs(table)):
        plan = compiler.compile(policies, as_tuple.setdefault(id(endpoints), tuple(endpoints)), NODE, secrets)
        fresh = compile_plan(policies, endpoints, NODE, secrets)
        assert plan == fresh, what
        rendered, expected = (
            Snapshot.from_resources(renderer.render(plan)),
            Snapshot.from_resources(render(fresh, PORTS)),
        )
        for type_url in TYPE_ORDER:
            assert rendered.digests(type_url) == expected.digests(type_url), f"{what}: {type_url}"


def test_a_policy_change_recompiles_and_renders_only_the_pods_it_selects() -> None:
    # The control-plane benchmark's cluster: policy p0 selects app-0, which pods 0 and 100 carry.
    policies, endpoints = synthetic(rules=100, endpoints=300)
    changed = synthetic(rules=10, endpoints=0, variant=1)[0][0]
    compiler, renderer = Compiler(), Renderer(PORTS)
    before = compiler.compile(policies, endpoints, NODE)
    routes_before = renderer.render(before).by_type[ROUTE_TYPE]
    after = compiler.compile([changed, *policies[1:]], endpoints, NODE)
    routes_after = renderer.render(after).by_type[ROUTE_TYPE]

    recompiled = {a.endpoint.name for a, b in zip(before.endpoints, after.endpoints, strict=True) if a is not b}
    assert recompiled == {"pod-0", "pod-100"}
    assert after.identities is before.identities and after.addresses is before.addresses
    rendered_again = {name for name in routes_after if routes_after[name] is not routes_before[name]}
    assert rendered_again == {"ingress/bench/pod-0", "ingress/bench/pod-100"}
    assert len(routes_after) == 20  # ten policies select app-0..app-9: pods 0-9 and 100-109
