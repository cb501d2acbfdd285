"""Make-before-break as one pure function: which L7 redirects Envoy is ready for, and what is still pending.

A port may be redirected to Envoy only once Envoy has ACKed both the listener filter chain that receives the
flow and the route configuration (with its RBAC) that decides it (ARCHITECTURE.md). Envoy reports what it
accepted by digest; a digest may belong to an earlier snapshot than the newest, so what each published
digest serves is remembered (`Served`). Readiness, status and the datapath all read one `Enforcement`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sidecarless.policy.plan import Plan
from sidecarless.redirect.maps import RedirectKey, redirect_key
from sidecarless.xds.acks import AckState
from sidecarless.xds.render import LISTENERS, chain_name, proxied_directions
from sidecarless.xds.resources import LISTENER_TYPE, ROUTE_TYPE, TYPE_ORDER
from sidecarless.xds.snapshot import Snapshot

SYNCED = "SYNCED"
PENDING = "PENDING"
NACKED = "NACKED"
NOT_CONNECTED = "envoy: not connected to xDS"
NOT_COMPILED = "policies not compiled yet"
NOTHING = Snapshot({})


@dataclass
class Served:
    """What published resources serve, by digest: a listener's filter chains, a route's redirects."""

    chains_by_listener_digest: dict[str, frozenset[str]] = field(default_factory=dict)
    redirects_by_route_digest: dict[str, frozenset[RedirectKey]] = field(default_factory=dict)

    def add(self, newer: Served) -> None:
        """Remember what a newly published snapshot serves (in place: a publish must not copy the history)."""
        self.chains_by_listener_digest.update(newer.chains_by_listener_digest)
        self.redirects_by_route_digest.update(newer.redirects_by_route_digest)


@dataclass(frozen=True)
class Target:
    """What the agent wants enforced: a snapshot and, per filter chain, the redirects its L7 ports need."""

    snapshot: Snapshot
    redirects_by_chain: Mapping[str, frozenset[RedirectKey]]
    served: Served  # what this snapshot's listeners and routes serve


@dataclass(frozen=True)
class TypeStatus:
    state: str  # SYNCED, PENDING or NACKED
    message: str | None  # Envoy's last rejection of this type


@dataclass(frozen=True)
class Enforcement:
    redirectable: frozenset[RedirectKey]  # what the maps may send to Envoy now
    xds: Mapping[str, TypeStatus]  # type URL -> whether Envoy holds what the target needs
    xds_pending: tuple[str, ...]
    redirect_pending: tuple[str, ...]


def target_of(plan: Plan, snapshot: Snapshot) -> Target:
    """The redirect keys of each chain, computed once per publish, and what the snapshot's digests serve."""
    redirects_by_chain = {
        chain_name(endpoint, direction): frozenset(
            redirect_key(endpoint.endpoint.key, direction, entry) for entry in endpoint.direction(direction).redirects
        )
        for endpoint in plan.endpoints
        for direction in proxied_directions(endpoint)
    }
    chains_by_listener_digest: dict[str, frozenset[str]] = {}
    for direction, listener_name in LISTENERS.items():
        listener = snapshot.resources[LISTENER_TYPE].get(listener_name)
        if listener is not None:
            chains_by_listener_digest[listener.digest] = frozenset(
                chain_name(endpoint, direction)
                for endpoint in plan.endpoints
                if direction in proxied_directions(endpoint)
            )
    routes = snapshot.resources[ROUTE_TYPE]
    redirects_by_route_digest = {routes[chain].digest: keys for chain, keys in redirects_by_chain.items()}
    return Target(snapshot, redirects_by_chain, Served(chains_by_listener_digest, redirects_by_route_digest))


def enforcement(target: Target | None, served: Served, acks: AckState, others: Sequence[AckState] = ()) -> Enforcement:
    """From what is wanted, what published digests serve and what Envoy accepted: what may be redirected and
    what is pending. `served` must include `target.served`. `acks` is the newest Envoy; `others` any older one
    still connected while the newest replaces it. The kernel spreads new connections over every Envoy that
    listens on the proxy port, so a port is redirected only where each of them that serves (has held a whole
    snapshot: a starting one's listeners are still warming) can take it."""
    xds = {type_url: _type_status(type_url, target, acks) for type_url in TYPE_ORDER}
    xds_pending = [] if acks.connected else [NOT_CONNECTED]
    if target is None:
        return Enforcement(frozenset(), xds, (*xds_pending, NOT_COMPILED), ())
    for type_url, status in xds.items():
        if status.state != SYNCED:
            detail = f"rejected: {status.message}" if status.message else "not yet ACKed"
            xds_pending.append(f"xds {type_url.rsplit('.', 1)[-1]}: {detail}")
    redirectable, redirect_pending = _redirects(target, served, acks)
    serving = [state for state in (acks, *others) if state.synced and not state.draining]
    if serving:
        redirectable = frozenset.intersection(*(_redirects(target, served, state)[0] for state in serving))
    return Enforcement(redirectable, xds, tuple(xds_pending), redirect_pending)


def _redirects(target: Target, served: Served, acks: AckState) -> tuple[frozenset[RedirectKey], tuple[str, ...]]:
    """What one Envoy can take (its listener chain and routes ACKed), and the chains it still lacks."""
    acked_chains = {
        chain
        for digest in acks.accepted.get(LISTENER_TYPE, {}).values()
        for chain in served.chains_by_listener_digest.get(digest, ())
    }
    acked_routes = acks.accepted.get(ROUTE_TYPE, {})
    redirectable: set[RedirectKey] = set()
    redirect_pending = []
    for chain, wanted in target.redirects_by_chain.items():
        accepted = served.redirects_by_route_digest.get(acked_routes.get(chain, ""), frozenset())
        if chain in acked_chains:
            redirectable |= wanted & accepted
        if chain not in acked_chains or not wanted <= accepted:
            redirect_pending.append(f"redirect {chain}: waiting for Envoy to ACK its listener chain and routes")
    return frozenset(redirectable), tuple(redirect_pending)


def _type_status(type_url: str, target: Target | None, acks: AckState) -> TypeStatus:
    enforced = acks.holds_type(type_url, target.snapshot if target is not None else NOTHING)
    rejected = acks.rejected.get(type_url)
    state = SYNCED if enforced else NACKED if rejected else PENDING
    return TypeStatus(state, rejected)
