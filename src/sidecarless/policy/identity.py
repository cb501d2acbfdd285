"""Identities, as Cilium gives them: pods share one when their labels are equal, CIDR prefixes named by
policies get their own, reserved ones have fixed numbers; and the ipcache, which maps addresses to them. Pure."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sidecarless.policy.model import (
    CLUSTER_LABEL,
    DIRECTIONS,
    NAMESPACE_LABEL,
    SERVICE_ACCOUNT_LABEL,
    Endpoint,
    Labels,
    Node,
    Policy,
    host_prefix,
)

# Reserved identities, as Cilium numbers them. 0 in a policy entry means "any peer".
ANY_IDENTITY = 0
HOST_IDENTITY = 1
WORLD_IDENTITY = 2
UNMANAGED_IDENTITY = 3
HEALTH_IDENTITY = 4
INIT_IDENTITY = 5
REMOTE_NODE_IDENTITY = 6
KUBE_APISERVER_IDENTITY = 7
INGRESS_IDENTITY = 8
# Dual-stack: an IPv6 address no prefix names is this one (as in Cilium); an IPv4 one stays plain world, so
# single-stack IPv4 keeps the identities it always had. The entity `world` is both.
WORLD_IPV6_IDENTITY = 10
WORLD_IDENTITIES = frozenset({WORLD_IDENTITY, WORLD_IPV6_IDENTITY})
RESERVED = {
    HOST_IDENTITY: "host",
    WORLD_IDENTITY: "world",
    UNMANAGED_IDENTITY: "unmanaged",
    HEALTH_IDENTITY: "health",
    INIT_IDENTITY: "init",
    REMOTE_NODE_IDENTITY: "remote-node",
    KUBE_APISERVER_IDENTITY: "kube-apiserver",
    INGRESS_IDENTITY: "ingress",
    WORLD_IPV6_IDENTITY: "world-ipv6",
}
# What every address of a family is in: the world identity of that family.
WORLD_PREFIXES = {"0.0.0.0/0": WORLD_IDENTITY, "::/0": WORLD_IPV6_IDENTITY}
_FIRST_POD_IDENTITY = 256
_POD_IDENTITY_SPACE = 1 << 16
_FIRST_CIDR_IDENTITY = 1 << 24  # Cilium's local (CIDR) identity scope
_CIDR_IDENTITY_SPACE = 1 << 16


@dataclass(frozen=True)
class Identity:
    number: int
    labels: Labels
    kind: str  # pod, reserved, cidr
    prefix: str | None = None  # a CIDR identity's own prefix


@dataclass(frozen=True)
class AddressSet:
    """The addresses of an identity, as Envoy matches them: in `include` and in none of `exclude`."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1 << 16)
def _network(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parsed once: a recompile after a policy change would otherwise parse every pod's address again."""
    return ipaddress.ip_network(prefix)


def pod_labels(endpoint: Endpoint, cluster_name: str) -> Labels:
    """The labels identity is derived from: the pod's own plus the ones Cilium adds."""
    derived = {
        NAMESPACE_LABEL: endpoint.namespace,
        CLUSTER_LABEL: cluster_name,
        SERVICE_ACCOUNT_LABEL: endpoint.service_account,
    }
    return tuple(sorted({**dict(endpoint.labels), **derived}.items()))


class TooManyIdentities(ValueError):
    """More label sets (or CIDR prefixes) than an identity space holds: the input cannot be compiled."""


def _stable_number(labels: Labels, first: int, space: int, taken: set[int]) -> int:
    """A number from a hash of the labels: stable across restarts and unrelated changes; collisions probe."""
    digest = int.from_bytes(hashlib.sha256(repr(labels).encode()).digest()[:4], "big")
    candidate = first + digest % space
    while candidate in taken:
        candidate = first + (candidate + 1 - first) % space
    taken.add(candidate)
    return candidate


def cidr_prefixes(policies: Iterable[Policy]) -> set[str]:
    prefixes: set[str] = set()
    for policy in policies:
        for rule in policy.rules:
            for direction in DIRECTIONS:
                for deny in (False, True):
                    for item in rule.section(direction, deny) or ():
                        for cidr in item.peers.cidrs or ():
                            prefixes.add(cidr.cidr)
                            prefixes.update(cidr.excepts)
    return prefixes - set(WORLD_PREFIXES)  # those are the world itself


def allocate_identities(
    endpoints: list[Endpoint], node: Node, prefixes: set[str]
) -> tuple[list[Identity], dict[str, int]]:
    """Every identity, and each endpoint's (by key)."""
    identities = [Identity(number, ((f"reserved:{name}", ""),), "reserved") for number, name in RESERVED.items()]
    taken: set[int] = set()
    by_labels: dict[Labels, int] = {}
    labels_by_key = {endpoint.key: pod_labels(endpoint, node.cluster_name) for endpoint in endpoints}
    # A full space would leave the probe below searching forever.
    if len(set(labels_by_key.values())) > _POD_IDENTITY_SPACE:
        raise TooManyIdentities(f"more than {_POD_IDENTITY_SPACE:,} distinct pod label sets")
    if len(prefixes) > _CIDR_IDENTITY_SPACE:
        raise TooManyIdentities(
            f"the policies name {len(prefixes):,} CIDR prefixes, more than the {_CIDR_IDENTITY_SPACE:,} CIDR identities"
        )
    for labels in sorted(set(labels_by_key.values())):
        number = _stable_number(labels, _FIRST_POD_IDENTITY, _POD_IDENTITY_SPACE, taken)
        by_labels[labels] = number
        identities.append(Identity(number, labels, "pod"))
    by_network = {network_key(prefix): prefix for prefix in prefixes}
    lengths = prefix_lengths(by_network)
    for prefix in sorted(prefixes):
        # A CIDR identity carries the labels of every policy prefix that contains it (Cilium does the same),
        # so a rule for 10.0.0.0/8 selects the identity of 10.1.0.0/16 too. Found by looking up each shorter
        # prefix of this one: linear in the number of prefixes.
        containing = sorted(by_network[key] for key in supernet_keys(prefix, lengths) if key in by_network)
        world = "reserved:world-ipv6" if ":" in prefix else "reserved:world"
        labels = (*((f"cidr:{other}", "") for other in containing), (world, ""))
        number = _stable_number(labels, _FIRST_CIDR_IDENTITY, _CIDR_IDENTITY_SPACE, taken)
        identities.append(Identity(number, labels, "cidr", prefix))
    endpoint_identity = {key: by_labels[labels] for key, labels in labels_by_key.items()}
    return identities, endpoint_identity


def build_ipcache(
    identities: list[Identity], endpoints: list[Endpoint], endpoint_identity: dict[str, int], node: Node
) -> dict[str, int]:
    ipcache: dict[str, int] = {}
    for identity in identities:
        if identity.prefix is not None:
            ipcache[identity.prefix] = identity.number
    for ip in node.remote_ips:
        ipcache[host_prefix(ip)] = REMOTE_NODE_IDENTITY
    for ip in node.ips:  # this node's own, should a source list it among the others too
        ipcache[host_prefix(ip)] = HOST_IDENTITY
    for endpoint in endpoints:
        for prefix in endpoint.prefixes:
            ipcache[prefix] = endpoint_identity[endpoint.key]
    return ipcache


def is_host_prefix(prefix: str) -> bool:
    return prefix.endswith("/128") if ":" in prefix else prefix.endswith("/32")


def identity_addresses(identities: list[Identity], ipcache: dict[str, int]) -> dict[int, AddressSet]:
    by_identity: dict[int, list[str]] = defaultdict(list)
    for prefix, number in ipcache.items():
        by_identity[number].append(prefix)
    # The prefixes of other identities inside each identity's own: each prefix looks up its shorter prefixes.
    owner = {network_key(prefix): number for prefix, number in ipcache.items()}
    lengths = prefix_lengths(owner)
    inside: dict[int, set[str]] = defaultdict(set)
    for prefix, number in ipcache.items():
        for key in supernet_keys(prefix, lengths):
            container = owner.get(key)
            if container is not None and container != number:
                inside[container].add(prefix)
    wider = {number for prefix, number in ipcache.items() if not is_host_prefix(prefix)}
    addresses: dict[int, AddressSet] = {}
    for identity in identities:
        own = sorted(by_identity.get(identity.number, []))
        world = next((prefix for prefix, number in WORLD_PREFIXES.items() if number == identity.number), None)
        if world is not None:
            # Every address of the family that no other identity holds.
            ipv6 = ":" in world
            named = tuple(sorted(prefix for prefix in ipcache if (":" in prefix) == ipv6))
            addresses[identity.number] = AddressSet((world,), named)
        elif own and identity.number not in wider:
            addresses[identity.number] = AddressSet(tuple(own))  # single addresses hold nothing more specific
        elif own:
            addresses[identity.number] = AddressSet(tuple(own), tuple(sorted(inside.get(identity.number, ()))))
    return addresses


@functools.lru_cache(maxsize=1 << 16)
def network_key(prefix: str) -> tuple[int, int, int]:
    """(family's bits, prefix length, network as an integer). IPv4 is read by hand: ipaddress takes 20 us a
    prefix, which 8,000 prefixes feel."""
    address, _, length_text = prefix.partition("/")
    octets = address.split(".")
    if len(octets) == 4 and all(octet.isdigit() for octet in octets):
        length = int(length_text) if length_text else 32
        value = (int(octets[0]) << 24) | (int(octets[1]) << 16) | (int(octets[2]) << 8) | int(octets[3])
        return 32, length, value >> (32 - length) << (32 - length)
    network = _network(prefix)
    return network.max_prefixlen, network.prefixlen, int(network.network_address)


def prefix_lengths(keys: Iterable[tuple[int, int, int]]) -> dict[int, list[int]]:
    """The prefix lengths present, per family (by its number of bits), shortest first."""
    lengths: dict[int, set[int]] = defaultdict(set)
    for bits, length, _ in keys:
        lengths[bits].add(length)
    return {bits: sorted(found) for bits, found in lengths.items()}


def supernet_keys(prefix: str, lengths: Mapping[int, list[int]]) -> list[tuple[int, int, int]]:
    """The keys of every prefix of the given lengths that contains `prefix`, itself included, shortest first:
    only lengths some prefix has can match, so a set of /32s costs one lookup each."""
    bits, length, address = network_key(prefix)
    return [
        (bits, shorter, address >> (bits - shorter) << (bits - shorter))
        for shorter in lengths.get(bits, ())
        if shorter <= length
    ]
