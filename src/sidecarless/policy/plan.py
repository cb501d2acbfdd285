"""The compiled result (compile.py): per pod and direction, who may reach which ports and what goes to the
proxy; the identities and the ipcache. What xds/render.py and redirect/maps.py read. Pure."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from dataclasses import dataclass, replace

from sidecarless.policy.identity import ANY_IDENTITY, WORLD_IDENTITY, WORLD_IPV6_IDENTITY, AddressSet, Identity
from sidecarless.policy.model import (
    INGRESS,
    Endpoint,
    HttpRule,
)

ALLOW = "allow"
REDIRECT = "redirect"
DENY = "deny"
# No rule for it: dropped where the direction is in default deny, else allowed. An entry has it only where an
# audited policy makes the audit verdict differ from that default (policy/audit.py).
NONE = "none"


@dataclass(frozen=True)
class AuditVerdict:
    """What every policy, audited ones included, decides for an entry's traffic (policy/audit.py). Reported,
    never enforced."""

    action: str  # ALLOW, REDIRECT, DENY or NONE
    http: tuple[HttpRule, ...] = ()  # for REDIRECT: the requests the audit verdict lets through
    origins: tuple[str, ...] = ()  # the rule items that decide it
    # The enforced verdict is ALLOW; the entry goes to the proxy (every request passing) only so that Envoy sees
    # the requests the audited L7 rules would decide. Until Envoy can take it, the kernel allows it.
    proxied_for_audit: bool = False


@dataclass(frozen=True)
class PolicyEntry:
    """Traffic from/to `peer_identity` on `protocol` ports `low`..`high` gets `action`. For a redirect, `http`
    lists the requests that may pass (any one matching); HttpRule() matches every request."""

    peer_identity: int
    protocol: str
    low: int
    high: int
    action: str  # ALLOW, REDIRECT or DENY
    http: tuple[HttpRule, ...] = ()
    origins: tuple[str, ...] = ()  # the rule items that decided it: "ns/policy spec.ingress[1]"
    # Where an audited policy selects the pod: the audit verdict beside the enforced one (policy/audit.py).
    audit: AuditVerdict | None = None


@dataclass(frozen=True)
class DirectionPolicy:
    enforced: bool  # default deny: what no entry allows is dropped
    entries: tuple[PolicyEntry, ...] = ()
    # None: no audited policy changes this direction's verdicts. Else whether the audit verdict is in default
    # deny, and every entry carries its audit verdict (policy/audit.py).
    audit_enforced: bool | None = None

    @property
    def redirects(self) -> tuple[PolicyEntry, ...]:
        return tuple(entry for entry in self.entries if entry.action == REDIRECT)

    def verdict(self, peer_identity: int, protocol: str, port: int) -> PolicyEntry | None:
        """What the datapath decides for a flow: the peer's own entry, else the any-peer entry."""
        for identity in (peer_identity, ANY_IDENTITY):
            for entry in self.entries:
                same = (entry.peer_identity, entry.protocol) == (identity, protocol)
                if same and entry.low <= port <= entry.high:
                    return entry
        return None

    def effective(self, identity: int) -> list[PolicyEntry]:
        """The entries the datapath uses for `identity`: its own, and the any-peer entries on the ports where
        it has none of its own."""
        own = [entry for entry in self.entries if entry.peer_identity == identity]
        result = list(own)
        for entry in self.entries:
            if entry.peer_identity != ANY_IDENTITY or identity == ANY_IDENTITY:
                continue
            pieces = [(entry.low, entry.high)]
            for mine in own:
                if mine.protocol != entry.protocol:
                    continue
                pieces = [
                    piece
                    for low, high in pieces
                    for piece in ((low, min(high, mine.low - 1)), (max(low, mine.high + 1), high))
                    if piece[0] <= piece[1]
                ]
            result += [replace(entry, low=low, high=high) for low, high in pieces]
        return result


@dataclass(frozen=True)
class EndpointPolicy:
    endpoint: Endpoint
    identity: int
    ingress: DirectionPolicy
    egress: DirectionPolicy
    # Which rules select this pod, for `policy trace`: (policy key, direction) pairs.
    selected_by: tuple[tuple[str, str], ...] = ()

    def direction(self, direction: str) -> DirectionPolicy:
        return self.ingress if direction == INGRESS else self.egress


@dataclass(frozen=True)
class Plan:
    identities: tuple[Identity, ...]
    endpoints: tuple[EndpointPolicy, ...]
    ipcache: tuple[tuple[str, int], ...]  # prefix -> identity; no match: world
    addresses: tuple[tuple[int, AddressSet], ...]  # identity -> its addresses
    problems: tuple[str, ...] = ()  # accepted input that cannot be fully honoured (a missing Secret)
    remote_pods: tuple[tuple[str, str], ...] = ()  # address -> namespace/name of other nodes' pods

    def remote_pod(self, ip: str) -> str | None:
        """The namespace/name of another node's pod with this address."""
        return self._remote_pods.get(ip)

    @functools.cached_property
    def _remote_pods(self) -> dict[str, str]:
        return dict(self.remote_pods)

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]

    def address_set(self, identity: int) -> AddressSet:
        return self._address_sets.get(identity, _NO_ADDRESSES)

    @functools.cached_property
    def _address_sets(self) -> dict[int, AddressSet]:
        return dict(self.addresses)

    def identity(self, number: int) -> Identity | None:
        return next((identity for identity in self.identities if identity.number == number), None)

    def endpoint(self, reference: str) -> EndpointPolicy | None:
        """A pod by namespace/name, address, or name when that is unique."""
        exact = [e for e in self.endpoints if reference == e.endpoint.key or reference in e.endpoint.ips]
        by_name = [e for e in self.endpoints if e.endpoint.name == reference]
        if len(exact) + len(by_name) > 1 and not exact:
            raise ValueError(f"pod name {reference!r} is ambiguous: use namespace/name")
        found = exact or by_name
        return found[0] if found else None


_NO_ADDRESSES = AddressSet(())


def identity_of_address(plan: Plan, ip: str) -> int:
    """The identity the datapath gives an address: the longest ipcache prefix of its family holding it, else
    the world of its family."""
    address = ipaddress.ip_address(ip)
    best: tuple[int, int] | None = None
    for prefix, identity in plan.ipcache:
        network = ipaddress.ip_network(prefix)
        if network.version == address.version and address in network and (best is None or network.prefixlen > best[0]):
            best = (network.prefixlen, identity)
    if best is not None:
        return best[1]
    return WORLD_IPV6_IDENTITY if address.version == 6 else WORLD_IDENTITY
