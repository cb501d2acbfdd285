"""Policies + endpoints -> Plan: per pod, which peers may reach which ports, and which go through the proxy.

Pure and deterministic: the same input gives an equal Plan (sorted tuples throughout), so everything rendered
from it is byte-identical and its versions are content hashes.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sidecarless.policy.schema import NAMESPACE_LABEL, HttpRule, LabelSelector, Policy

# Reserved identities, as Cilium numbers them. 0 in a policy entry means "any peer".
ANY_IDENTITY = 0
HOST_IDENTITY = 1
WORLD_IDENTITY = 2
_FIRST_POD_IDENTITY = 256
_IDENTITY_SPACE = 1 << 24


@dataclass(frozen=True)
class Endpoint:
    """A pod on this node: where its traffic enters the node and what labels it carries."""

    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ip: str
    interface: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def identity_labels(self) -> tuple[tuple[str, str], ...]:
        """The labels identity is derived from: the pod's own plus the ones Cilium adds."""
        return tuple(sorted({*self.labels, (NAMESPACE_LABEL, self.namespace)}))


@dataclass(frozen=True)
class Peer:
    identity: int  # ANY_IDENTITY: every peer
    ips: tuple[str, ...]  # addresses holding this identity (empty for ANY_IDENTITY)


@dataclass(frozen=True)
class L7Allow:
    peer: Peer
    http: tuple[HttpRule, ...]  # any one may match; HttpRule() matches every request


@dataclass(frozen=True)
class ProxiedPort:
    """A port of a pod whose traffic goes through Envoy, with who may send which requests."""

    port: int
    allows: tuple[L7Allow, ...]


@dataclass(frozen=True)
class KernelAllow:
    """One entry of the kernel's policy map: traffic from `peer_identity` to this pod's `port`/`protocol`
    passes (port 0 = every port); `redirect` hands it to the proxy instead."""

    peer_identity: int
    port: int
    protocol: str  # TCP, UDP or ICMP
    redirect: bool


@dataclass(frozen=True)
class EndpointPolicy:
    endpoint: Endpoint
    identity: int
    ingress_enforced: bool  # default deny on ingress: only what `kernel` lists passes
    kernel: tuple[KernelAllow, ...]
    proxied: tuple[ProxiedPort, ...]


@dataclass(frozen=True)
class Plan:
    identities: tuple[tuple[int, tuple[tuple[str, str], ...]], ...]  # identity -> labels
    endpoints: tuple[EndpointPolicy, ...]

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


def allocate_identities(
    label_sets: Iterable[tuple[tuple[str, str], ...]],
) -> dict[tuple[tuple[str, str], ...], int]:
    """Numeric identity per distinct label set: a hash of the labels, so it is stable across restarts and
    unrelated changes; collisions are resolved by probing in sorted order."""
    taken: set[int] = set()
    identities: dict[tuple[tuple[str, str], ...], int] = {}
    for labels in sorted(set(label_sets)):
        digest = int.from_bytes(hashlib.sha256(repr(labels).encode()).digest()[:4], "big")
        candidate = _FIRST_POD_IDENTITY + digest % (_IDENTITY_SPACE - _FIRST_POD_IDENTITY)
        while candidate in taken:
            candidate = _FIRST_POD_IDENTITY + (candidate + 1 - _FIRST_POD_IDENTITY) % (
                _IDENTITY_SPACE - _FIRST_POD_IDENTITY
            )
        taken.add(candidate)
        identities[labels] = candidate
    return identities


def selects(selector: LabelSelector, policy_namespace: str, labels: tuple[tuple[str, str], ...]) -> bool:
    """A peer selector matches labels; without a namespace label it means the policy's namespace."""
    label_map = dict(labels)
    if not any(key == NAMESPACE_LABEL for key, _ in selector.match_labels) and (
        label_map.get(NAMESPACE_LABEL) != policy_namespace
    ):
        return False
    return selector.matches(label_map)


@dataclass(frozen=True)
class _Allow:
    peer_identity: int
    port: int
    protocol: str  # TCP, UDP, ANY
    http: tuple[HttpRule, ...] | None  # None: L3/L4 allow


def compile_plan(policies: Iterable[Policy], endpoints: Iterable[Endpoint]) -> Plan:
    endpoint_list = sorted(endpoints, key=lambda endpoint: endpoint.key)
    policy_list = sorted(policies, key=lambda policy: policy.key)
    identities = allocate_identities(endpoint.identity_labels() for endpoint in endpoint_list)
    ips_by_identity: dict[int, list[str]] = defaultdict(list)
    for endpoint in endpoint_list:
        ips_by_identity[identities[endpoint.identity_labels()]].append(endpoint.ip)

    compiled = []
    for endpoint in endpoint_list:
        selecting = [
            policy
            for policy in policy_list
            if policy.namespace == endpoint.namespace
            and policy.endpoint_selector.matches(dict(endpoint.labels))
        ]
        enforced = any(policy.ingress is not None for policy in selecting)
        allows = [allow for policy in selecting for allow in _ingress_allows(policy, identities)]
        kernel, proxied = _resolve(allows, ips_by_identity)
        compiled.append(
            EndpointPolicy(endpoint, identities[endpoint.identity_labels()], enforced, kernel, proxied)
        )
    identity_table = tuple(sorted((number, labels) for labels, number in identities.items()))
    return Plan(identity_table, tuple(compiled))


def _ingress_allows(policy: Policy, identities: dict[tuple[tuple[str, str], ...], int]) -> list[_Allow]:
    allows: list[_Allow] = []
    for rule in policy.ingress or ():
        if rule.from_endpoints is None:
            peers = {ANY_IDENTITY}
        else:
            peers = {
                number
                for labels, number in identities.items()
                for selector in rule.from_endpoints
                if selects(selector, policy.namespace, labels)
            }
        for peer in sorted(peers):
            if not rule.to_ports:
                allows.append(_Allow(peer, 0, "ANY", None))
            for port_rule in rule.to_ports:
                for port in port_rule.ports or ():
                    allows.append(_Allow(peer, port.port, port.protocol, port_rule.http))
    return allows


def _covers(allow: _Allow, port: int, protocol: str) -> bool:
    return allow.port in (0, port) and allow.protocol in ("ANY", protocol)


def _kernel_protocols(allow: _Allow) -> tuple[str, ...]:
    if allow.protocol != "ANY":
        return (allow.protocol,)
    # An allow of every port and protocol (an L3 allow) also lets ICMP through.
    return ("TCP", "UDP", "ICMP") if allow.port == 0 else ("TCP", "UDP")


def _resolve(
    allows: list[_Allow], ips_by_identity: dict[int, list[str]]
) -> tuple[tuple[KernelAllow, ...], tuple[ProxiedPort, ...]]:
    """Split allows into kernel entries and proxied ports. An L3/L4 allow for a peer and port shadows L7
    rules for that peer and port (POLICY.md): such a peer goes straight through in the kernel."""
    plain = [allow for allow in allows if allow.http is None]
    kernel: set[KernelAllow] = set()
    for allow in plain:
        for protocol in _kernel_protocols(allow):
            kernel.add(KernelAllow(allow.peer_identity, allow.port, protocol, redirect=False))

    rules_by_port: dict[int, dict[int, set[HttpRule]]] = defaultdict(lambda: defaultdict(set))
    for allow in allows:
        if allow.http is None:
            continue
        shadowed = any(
            other.peer_identity in (ANY_IDENTITY, allow.peer_identity) and _covers(other, allow.port, "TCP")
            for other in plain
        )
        if not shadowed:
            rules_by_port[allow.port][allow.peer_identity].update(allow.http or (HttpRule(),))

    proxied = []
    for port, by_peer in sorted(rules_by_port.items()):
        port_allows = []
        for identity, rules in sorted(by_peer.items()):
            kernel.add(KernelAllow(identity, port, "TCP", redirect=True))
            peer = Peer(identity, tuple(sorted(ips_by_identity.get(identity, ()))))
            ordered = tuple(sorted(rules, key=lambda rule: (rule.method or "", rule.path or "")))
            port_allows.append(L7Allow(peer, ordered))
        proxied.append(ProxiedPort(port, tuple(port_allows)))
    ordered_kernel = tuple(sorted(kernel, key=lambda k: (k.peer_identity, k.port, k.protocol, k.redirect)))
    return ordered_kernel, tuple(proxied)
