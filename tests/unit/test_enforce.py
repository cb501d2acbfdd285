"""The ACK gate (agent/enforce.py) from a table: plan, snapshot and what Envoy accepted -> the redirects the
maps may hold, and what readiness and status report as pending. One function decides for all three."""

from dataclasses import dataclass, field

import pytest

from sidecarless.agent.enforce import (
    NACKED,
    NOT_COMPILED,
    NOT_CONNECTED,
    PENDING,
    SYNCED,
    Enforcement,
    Served,
    Target,
    enforcement,
    target_of,
)
from sidecarless.policy.model import EGRESS, INGRESS
from sidecarless.xds.acks import AckState
from sidecarless.xds.render import render
from sidecarless.xds.resources import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE
from sidecarless.xds.snapshot import Snapshot
from tests.unit.test_policy_semantics import plan_of

PORTS = {INGRESS: 15001, EGRESS: 15002}
BILLING = "ingress/production/billing-api"
OTHER = "ingress/production/other-api"


def policy(billing_paths: tuple[str, ...], other: bool = True) -> str:
    """L7 ingress rules on billing-api (8080, the given paths), and on other-api (9090) if `other`."""
    rules = ", ".join(f"{{method: GET, path: '{path}'}}" for path in billing_paths)
    text = f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: billing, namespace: production}}
        spec:
          endpointSelector: {{matchLabels: {{app: billing-api}}}}
          ingress:
            - fromEndpoints: [{{matchLabels: {{app: prometheus}}}}]
              toPorts: [{{ports: [{{port: "8080", protocol: TCP}}], rules: {{http: [{rules}]}}}}]
            - fromEndpoints: [{{matchLabels: {{app: finance-batch}}}}]
              toPorts: [{{ports: [{{port: "8080", protocol: TCP}}], rules: {{http: [{rules}]}}}}]
        """
    if other:
        text += """
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: other, namespace: production}
        spec:
          endpointSelector: {matchLabels: {app: other-api}}
          ingress:
            - fromEndpoints: [{matchLabels: {app: prometheus}}]
              toPorts: [{ports: [{port: "9090", protocol: TCP}], rules: {http: [{method: GET}]}}]
        """
    return text


def target(billing_paths: tuple[str, ...] = ("/a",), other: bool = True) -> Target:
    plan = plan_of(policy(billing_paths, other))
    return target_of(plan, Snapshot.from_resources(render(plan, PORTS)))


NOW = target()
# A second pod's rules added to what Envoy already has: a new chain in the listener, a new route.
BEFORE_OTHER = target(other=False)
# A different rule for the same pod: a new route digest serving the same redirects.
NEW_PATHS = target(("/a", "/b"))


def accepted(*targets_and_types: tuple[Target, str]) -> dict[str, dict[str, str]]:
    """What Envoy holds: per type, the digests of the given target's snapshot."""
    held: dict[str, dict[str, str]] = {}
    for source, type_url in targets_and_types:
        held[type_url] = source.snapshot.digests(type_url)
    return held


def all_of(source: Target) -> dict[str, dict[str, str]]:
    return accepted((source, CLUSTER_TYPE), (source, LISTENER_TYPE), (source, ROUTE_TYPE))


@dataclass(frozen=True)
class Case:
    name: str
    target: Target | None
    acks: AckState
    redirected_chains: tuple[str, ...]  # chains whose redirect keys may be in the maps
    states: dict[str, str]  # type URL -> SYNCED / PENDING / NACKED
    pending: tuple[str, ...]  # substrings, in order, of what readiness waits for
    published: tuple[Target, ...] = field(default=())  # earlier snapshots whose digests Envoy may still hold


def connected(held: dict[str, dict[str, str]], rejected: dict[str, str] | None = None) -> AckState:
    return AckState(accepted=held, rejected=rejected or {}, connected=True)


CASES = [
    Case(
        "nothing compiled yet",
        None,
        connected({}),
        (),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: SYNCED, ROUTE_TYPE: SYNCED},
        (NOT_COMPILED,),
    ),
    Case(
        "Envoy not connected: nothing is redirected",
        NOW,
        AckState(),
        (),
        {CLUSTER_TYPE: PENDING, LISTENER_TYPE: PENDING, ROUTE_TYPE: PENDING},
        (
            f"redirect {BILLING}",
            f"redirect {OTHER}",
            NOT_CONNECTED,
            "xds Cluster: not yet ACKed",
            "xds Listener",
            "xds RouteConfiguration",
        ),
    ),
    Case(
        "everything ACKed: every L7 port redirected, nothing pending",
        NOW,
        connected(all_of(NOW)),
        (BILLING, OTHER),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: SYNCED, ROUTE_TYPE: SYNCED},
        (),
    ),
    Case(
        "listener ACKed, routes not yet: nothing redirected",
        NOW,
        connected(accepted((NOW, CLUSTER_TYPE), (NOW, LISTENER_TYPE))),
        (),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: SYNCED, ROUTE_TYPE: PENDING},
        (f"redirect {BILLING}", f"redirect {OTHER}", "xds RouteConfiguration: not yet ACKed"),
    ),
    Case(
        "routes ACKed, listener not: nothing redirected",
        NOW,
        connected(accepted((NOW, CLUSTER_TYPE), (NOW, ROUTE_TYPE))),
        (),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: PENDING, ROUTE_TYPE: SYNCED},
        (f"redirect {BILLING}", f"redirect {OTHER}", "xds Listener: not yet ACKed"),
    ),
    Case(
        "a new pod's chain: the old listener lacks it, so only the old pod stays redirected",
        NOW,
        connected({**all_of(BEFORE_OTHER), ROUTE_TYPE: NOW.snapshot.digests(ROUTE_TYPE)}),
        (BILLING,),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: PENDING, ROUTE_TYPE: SYNCED},
        (f"redirect {OTHER}", "xds Listener: not yet ACKed"),
        (BEFORE_OTHER,),
    ),
    Case(
        "a new route NACKed: the old route serves the same port, which stays redirected (last good config)",
        NEW_PATHS,
        connected({**all_of(NEW_PATHS), ROUTE_TYPE: NOW.snapshot.digests(ROUTE_TYPE)}, {ROUTE_TYPE: "bad regex"}),
        (BILLING, OTHER),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: SYNCED, ROUTE_TYPE: NACKED},
        ("xds RouteConfiguration: rejected: bad regex",),
        (NOW,),
    ),
    Case(
        "a route digest never published: not trusted",
        NOW,
        connected({**all_of(NOW), ROUTE_TYPE: {BILLING: "0" * 16, OTHER: NOW.snapshot.digests(ROUTE_TYPE)[OTHER]}}),
        (OTHER,),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: SYNCED, ROUTE_TYPE: PENDING},
        (f"redirect {BILLING}", "xds RouteConfiguration: not yet ACKed"),
    ),
    Case(
        "a pod's rules removed, Envoy still holds the old listener: status and readiness both wait",
        BEFORE_OTHER,
        connected({**all_of(NOW), ROUTE_TYPE: NOW.snapshot.digests(ROUTE_TYPE)}),
        (BILLING,),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: PENDING, ROUTE_TYPE: SYNCED},
        ("xds Listener: not yet ACKed",),
        (NOW,),
    ),
    Case(
        "the egress listener removed, Envoy still holds it: a full set must match, so not SYNCED",
        NOW,
        connected(
            {**all_of(NOW), LISTENER_TYPE: {**NOW.snapshot.digests(LISTENER_TYPE), "sidecarless/egress": "e" * 16}}
        ),
        (BILLING, OTHER),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: PENDING, ROUTE_TYPE: SYNCED},
        ("xds Listener: not yet ACKed",),
    ),
    Case(
        "Envoy still holds the routes of a removed chain: named types need only what the snapshot holds",
        NOW,
        connected({**all_of(NOW), ROUTE_TYPE: {**NOW.snapshot.digests(ROUTE_TYPE), "egress/production/x": "f" * 16}}),
        (BILLING, OTHER),
        {CLUSTER_TYPE: SYNCED, LISTENER_TYPE: SYNCED, ROUTE_TYPE: SYNCED},
        (),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_the_ack_gate(case: Case) -> None:
    served = Served()
    for earlier in (*case.published, *((case.target,) if case.target else ())):
        served.add(earlier.served)
    result = enforcement(case.target, served, case.acks)
    wanted = case.target.redirects_by_chain if case.target else {}
    assert result.redirectable == frozenset().union(*(wanted[chain] for chain in case.redirected_chains))
    assert {type_url: status.state for type_url, status in result.xds.items()} == case.states
    pending = [*result.redirect_pending, *result.xds_pending]
    assert len(pending) == len(case.pending), pending
    for item, expected in zip(pending, case.pending, strict=True):
        assert expected in item


def test_redirect_keys_are_the_plans_l7_ports() -> None:
    """Each chain's keys are its pod's redirect entries: billing-api 8080 from two peers, other-api 9090."""
    ports = {chain: {(key[4], key[5]) for key in keys} for chain, keys in NOW.redirects_by_chain.items()}
    assert ports == {BILLING: {(8080, 8080)}, OTHER: {(9090, 9090)}}
    assert len(NOW.redirects_by_chain[BILLING]) == 2


def test_readiness_and_status_agree() -> None:
    """Whatever Envoy holds, a type is SYNCED exactly when readiness has nothing pending for it."""
    for case in CASES:
        result: Enforcement = enforcement(case.target, Served(), case.acks)
        for type_url, status in result.xds.items():
            named = f"xds {type_url.rsplit('.', 1)[-1]}:"
            waiting = any(item.startswith(named) for item in result.xds_pending)
            assert waiting == (status.state != SYNCED and case.target is not None), (case.name, type_url)


def serving(held: dict[str, dict[str, str]], instance: str, draining: bool = False) -> AckState:
    """An Envoy that has held a whole snapshot (its listeners are active): it takes what the kernel sends."""
    return AckState(accepted=held, connected=True, instance=instance, synced=True, draining=draining)


@pytest.mark.parametrize(
    ("name", "newest", "older", "redirected_chains"),
    [
        ("the new Envoy still starting: the old one decides", connected({}), serving(all_of(NOW), "1"),
         (BILLING, OTHER)),
        ("the new one holds the listener, routes on the way (warming): still the old one",
         connected(accepted((NOW, CLUSTER_TYPE), (NOW, LISTENER_TYPE))), serving(all_of(NOW), "1"),
         (BILLING, OTHER)),
        ("both serve, the new one lacks a chain: only what both can take",
         serving(all_of(BEFORE_OTHER), "2"), serving(all_of(NOW), "1"), (BILLING,)),
        ("both serve, the old one lacks a chain: only what both can take",
         serving(all_of(NOW), "2"), serving(all_of(BEFORE_OTHER), "1"), (BILLING,)),
        ("the old one drains: the new one alone",
         serving(all_of(NOW), "2"), serving(all_of(BEFORE_OTHER), "1", draining=True), (BILLING, OTHER)),
    ],
)  # fmt: skip
def test_while_one_envoy_replaces_another_a_port_goes_only_where_each_serving_one_can_take_it(
    name: str, newest: AckState, older: AckState, redirected_chains: tuple[str, ...]
) -> None:
    """The kernel spreads new connections over both Envoys' sockets on the proxy port (SO_REUSEPORT)."""
    served = Served()
    for published in (BEFORE_OTHER, NOW):
        served.add(published.served)
    result = enforcement(NOW, served, newest, [older])
    expected = frozenset().union(*(NOW.redirects_by_chain[chain] for chain in redirected_chains))
    assert result.redirectable == expected, name
