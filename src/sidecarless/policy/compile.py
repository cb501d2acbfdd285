"""Policies + endpoints -> Plan: per pod and direction, who may reach which ports, and what goes to the proxy.

Pure and deterministic: the same input gives an equal Plan (sorted tuples throughout), so everything rendered
from it is byte-identical and its versions are content hashes.

The semantics (POLICY.md):
- a pod selected by a rule with a section for a direction is in default deny for that direction (unless
  every such rule says `enableDefaultDeny: false`); allowed traffic is the union of all allows;
- deny rules win over every allow;
- an L3/L4 allow for a peer and port shadows L7 rules for that peer and port (the peer goes through
  untouched); L7 rules from several rules are ORed;
- peers are identities: pods share one when their labels are equal; CIDRs and entities are identities too.

Resolution gives, per (peer identity, protocol), disjoint port intervals with one action each. An entry for a
specific identity already includes what "any peer" rules give it, so the datapath may look up the identity
first and fall back to "any peer" only when the identity has no entry of its own.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from sidecarless.policy.model import (
    ALL_PORTS,
    CCNP,
    CLUSTER_LABEL,
    DEFAULT_CLUSTER_NAME,
    DIRECTIONS,
    EGRESS,
    INGRESS,
    NAMESPACE_LABEL,
    SERVICE_ACCOUNT_LABEL,
    CidrRule,
    HeaderValue,
    HttpRule,
    LabelSelector,
    Peers,
    Policy,
    PortProtocol,
    Secret,
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
RESERVED = {
    HOST_IDENTITY: "host",
    WORLD_IDENTITY: "world",
    UNMANAGED_IDENTITY: "unmanaged",
    HEALTH_IDENTITY: "health",
    INIT_IDENTITY: "init",
    REMOTE_NODE_IDENTITY: "remote-node",
    KUBE_APISERVER_IDENTITY: "kube-apiserver",
    INGRESS_IDENTITY: "ingress",
}
_FIRST_POD_IDENTITY = 256
_POD_IDENTITY_SPACE = 1 << 16
_FIRST_CIDR_IDENTITY = 1 << 24  # Cilium's local (CIDR) identity scope
_CIDR_IDENTITY_SPACE = 1 << 16

ALLOW = "allow"
REDIRECT = "redirect"
DENY = "deny"
PROTOCOLS = ("TCP", "UDP", "SCTP", "ICMP")
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP")  # what `protocol: ANY` (or none) means

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class NamedPort:
    name: str
    port: int
    protocol: str  # TCP or UDP


@dataclass(frozen=True)
class Endpoint:
    """A pod: what labels it carries and, on this node, where its traffic enters the node. Pods of other nodes
    (`local` false) get identities, so rules can name them as peers, but no policy of their own here."""

    name: str
    namespace: str
    labels: Labels
    ip: str
    interface: str  # "" for a pod of another node
    service_account: str = "default"
    named_ports: tuple[NamedPort, ...] = ()
    local: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Node:
    """What compile needs to know of the node: its addresses (the host identity) and the cluster name."""

    ips: tuple[str, ...] = ()
    cluster_name: str = DEFAULT_CLUSTER_NAME


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


@dataclass(frozen=True)
class DirectionPolicy:
    enforced: bool  # default deny: what no entry allows is dropped
    entries: tuple[PolicyEntry, ...] = ()

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
        exact = [e for e in self.endpoints if reference in (e.endpoint.key, e.endpoint.ip)]
        by_name = [e for e in self.endpoints if e.endpoint.name == reference]
        if len(exact) + len(by_name) > 1 and not exact:
            raise ValueError(f"pod name {reference!r} is ambiguous: use namespace/name")
        found = exact or by_name
        return found[0] if found else None


_NO_ADDRESSES = AddressSet(())


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


def _cidr_prefixes(policies: Iterable[Policy]) -> set[str]:
    prefixes: set[str] = set()
    for policy in policies:
        for rule in policy.rules:
            for direction in DIRECTIONS:
                for deny in (False, True):
                    for item in rule.section(direction, deny) or ():
                        for cidr in item.peers.cidrs or ():
                            prefixes.add(cidr.cidr)
                            prefixes.update(cidr.excepts)
    prefixes.discard("0.0.0.0/0")  # that is the world itself
    return prefixes


def _identities(endpoints: list[Endpoint], node: Node, prefixes: set[str]) -> tuple[list[Identity], dict[str, int]]:
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
    by_network = {_network_key(prefix): prefix for prefix in prefixes}
    lengths = _lengths(by_network)
    for prefix in sorted(prefixes):
        # A CIDR identity carries the labels of every policy prefix that contains it (Cilium does the same),
        # so a rule for 10.0.0.0/8 selects the identity of 10.1.0.0/16 too. Found by looking up each shorter
        # prefix of this one: linear in the number of prefixes.
        containing = sorted(by_network[key] for key in _supernet_keys(prefix, lengths) if key in by_network)
        labels = (*((f"cidr:{other}", "") for other in containing), ("reserved:world", ""))
        number = _stable_number(labels, _FIRST_CIDR_IDENTITY, _CIDR_IDENTITY_SPACE, taken)
        identities.append(Identity(number, labels, "cidr", prefix))
    endpoint_identity = {key: by_labels[labels] for key, labels in labels_by_key.items()}
    return identities, endpoint_identity


def _ipcache(
    identities: list[Identity], endpoints: list[Endpoint], endpoint_identity: dict[str, int], node: Node
) -> dict[str, int]:
    ipcache: dict[str, int] = {}
    for identity in identities:
        if identity.prefix is not None:
            ipcache[identity.prefix] = identity.number
    for ip in node.ips:
        ipcache[f"{ip}/32"] = HOST_IDENTITY
    for endpoint in endpoints:
        ipcache[f"{endpoint.ip}/32"] = endpoint_identity[endpoint.key]
    return ipcache


def _addresses(identities: list[Identity], ipcache: dict[str, int]) -> dict[int, AddressSet]:
    by_identity: dict[int, list[str]] = defaultdict(list)
    for prefix, number in ipcache.items():
        by_identity[number].append(prefix)
    # The prefixes of other identities inside each identity's own: each prefix looks up its shorter prefixes.
    owner = {_network_key(prefix): number for prefix, number in ipcache.items()}
    lengths = _lengths(owner)
    inside: dict[int, set[str]] = defaultdict(set)
    for prefix, number in ipcache.items():
        for key in _supernet_keys(prefix, lengths):
            container = owner.get(key)
            if container is not None and container != number:
                inside[container].add(prefix)
    wider = {number for prefix, number in ipcache.items() if not prefix.endswith("/32")}
    addresses: dict[int, AddressSet] = {}
    for identity in identities:
        own = sorted(by_identity.get(identity.number, []))
        if identity.number == WORLD_IDENTITY:
            addresses[identity.number] = AddressSet(("0.0.0.0/0",), tuple(sorted(ipcache)))
        elif own and identity.number not in wider:
            addresses[identity.number] = AddressSet(tuple(own))  # single addresses hold nothing more specific
        elif own:
            addresses[identity.number] = AddressSet(tuple(own), tuple(sorted(inside.get(identity.number, ()))))
    return addresses


def _select_peers(peers: Peers, namespace: str | None, identities: list[Identity]) -> frozenset[int] | None:
    """The identities a rule item's peer fields select; None: every peer."""
    if peers.any_peer:
        return None
    selected: set[int] = set()
    for selector in peers.endpoints or ():
        selected.update(i.number for i in identities if i.kind == "pod" and _selects(selector, namespace, i.labels))
    if peers.cidrs:
        by_label: dict[str, list[Identity]] = defaultdict(list)
        for identity in identities:
            if identity.kind == "cidr":
                for label, _ in identity.labels:
                    by_label[label].append(identity)
        for cidr in peers.cidrs:
            selected.update(_select_cidr(cidr, identities, by_label))
    for entity in peers.entities or ():
        if entity == "all":
            return None
        selected.update(_select_entity(entity, identities))
    return frozenset(selected)


def _selects(selector: LabelSelector, namespace: str | None, labels: Labels) -> bool:
    """A peer selector over pod labels; in a namespaced policy, without a namespace label it means the
    policy's namespace."""
    label_map = dict(labels)
    if (
        namespace is not None
        and not selector.constrains(NAMESPACE_LABEL)
        and label_map.get(NAMESPACE_LABEL) != namespace
    ):
        return False
    return selector.matches(label_map)


def _select_cidr(cidr: CidrRule, identities: list[Identity], by_label: Mapping[str, list[Identity]]) -> set[int]:
    """`by_label`: the CIDR identities carrying each `cidr:` label."""
    excepted = {f"cidr:{prefix}" for prefix in cidr.excepts}
    if cidr.cidr == "0.0.0.0/0":
        candidates = [i for i in identities if i.kind == "cidr"]
        selected = {WORLD_IDENTITY}
    else:
        candidates = by_label.get(f"cidr:{cidr.cidr}", [])
        selected = set()
    return selected | {i.number for i in candidates if not excepted.intersection(label for label, _ in i.labels)}


@functools.lru_cache(maxsize=1 << 16)
def _network_key(prefix: str) -> tuple[int, int, int]:
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


def _lengths(keys: Iterable[tuple[int, int, int]]) -> dict[int, list[int]]:
    """The prefix lengths present, per family (by its number of bits), shortest first."""
    lengths: dict[int, set[int]] = defaultdict(set)
    for bits, length, _ in keys:
        lengths[bits].add(length)
    return {bits: sorted(found) for bits, found in lengths.items()}


def _supernet_keys(prefix: str, lengths: Mapping[int, list[int]]) -> list[tuple[int, int, int]]:
    """The keys of every prefix of the given lengths that contains `prefix`, itself included, shortest first:
    only lengths some prefix has can match, so a set of /32s costs one lookup each."""
    bits, length, address = _network_key(prefix)
    return [
        (bits, shorter, address >> (bits - shorter) << (bits - shorter))
        for shorter in lengths.get(bits, ())
        if shorter <= length
    ]


def _select_entity(entity: str, identities: list[Identity]) -> set[int]:
    if entity == "world":
        return {WORLD_IDENTITY} | {i.number for i in identities if i.kind == "cidr"}
    if entity == "cluster":
        return {i.number for i in identities if i.kind == "pod"} | (set(RESERVED) - {WORLD_IDENTITY})
    number = next(n for n, name in RESERVED.items() if name == entity)
    return {number}


@dataclass(frozen=True)
class _Grant:
    peers: frozenset[int] | None  # None: any peer
    protocol: str  # TCP, UDP, ICMP
    low: int
    high: int
    action: str  # ALLOW (L3/L4), REDIRECT (L7 rules), DENY
    http: tuple[HttpRule, ...] = ()
    origin: str = ""


@dataclass
class _Context:
    """What every pod's compile reads: the identities of the pods and prefixes, and the Secrets."""

    identities: list[Identity]
    endpoints: list[Endpoint]
    endpoint_identity: dict[str, int]
    secrets: Mapping[str, Secret]
    problems: list[str] = field(default_factory=list)

    def select_peers(self, peers: Peers, namespace: str | None) -> frozenset[int] | None:
        """The identities an item selects; the same for every pod the rule selects, so worked out once."""
        key = (peers, namespace)
        if key not in self._peers:
            self._peers[key] = _select_peers(peers, namespace, self.identities)
        return self._peers[key]

    def __post_init__(self) -> None:
        self._peers: dict[tuple[Peers, str | None], frozenset[int] | None] = {}
        by_number = {identity.number: dict(identity.labels) for identity in self.identities}
        self.endpoint_labels = {key: by_number[number] for key, number in self.endpoint_identity.items()}

    def named_ports(self, name: str, peers: frozenset[int] | None) -> dict[int | None, set[tuple[int, str]]]:
        """Egress: a named port resolved on the destination pods, per destination identity."""
        found: dict[int | None, set[tuple[int, str]]] = defaultdict(set)
        for endpoint in self.endpoints:
            identity = self.endpoint_identity[endpoint.key]
            if peers is not None and identity not in peers:
                continue
            for named in endpoint.named_ports:
                if named.name == name:
                    found[identity if peers is not None else None].add((named.port, named.protocol))
        return found


def _port_grants(
    port: PortProtocol, peers: frozenset[int] | None, direction: str, subject: Endpoint, context: _Context
) -> list[tuple[frozenset[int] | None, str, int, int]]:
    """(peers, protocol, low, high) for one port item; named ports resolve on the pod that owns the port:
    the subject for ingress, the destination for egress."""
    protocols = PORT_PROTOCOLS if port.protocol == "ANY" else (port.protocol,)
    if port.name is None:
        return [(peers, protocol, port.port, port.end_port) for protocol in protocols]
    resolved: dict[int | None, set[tuple[int, str]]]
    if direction == INGRESS:
        resolved = {None: {(n.port, n.protocol) for n in subject.named_ports if n.name == port.name}}
    else:
        resolved = context.named_ports(port.name, peers)
    grants = []
    for identity, numbers in resolved.items():
        for number, declared in sorted(numbers):
            for protocol in protocols:
                if protocol == declared:
                    grants.append((frozenset({identity}) if identity is not None else peers, protocol, number, number))
    return grants


def _resolve_http(rules: tuple[HttpRule, ...], context: _Context, where: str) -> tuple[HttpRule, ...]:
    """headerMatches resolved into header conditions, Secrets read. A rule whose Secret is missing matches
    nothing (fail closed) and is reported."""
    resolved = []
    for rule in rules:
        headers = list(rule.headers)
        usable = True
        for match in rule.header_matches:
            value = match.value
            if match.secret is not None:
                secret = context.secrets.get(f"{match.secret.namespace}/{match.secret.name}")
                value = secret.value() if secret is not None else None
                if value is None:
                    context.problems.append(
                        f"{where}: Secret {match.secret.namespace}/{match.secret.name} not found "
                        f"or has no value; the HTTP rule that needs it matches nothing"
                    )
                    usable = False
            headers.append(HeaderValue(match.name, value, match.mismatch))
        if usable:
            resolved.append(replace(rule, headers=tuple(headers), header_matches=()))
    return tuple(resolved)


def _grants(policy: Policy, direction: str, deny: bool, subject: Endpoint, context: _Context) -> list[_Grant]:
    grants: list[_Grant] = []
    section_name = f"{direction}Deny" if deny else direction
    for rule_index, rule in enumerate(policy.rules):
        section = rule.section(direction, deny)
        if section is None or not _subject_selected(policy, rule.endpoint_selector, subject, context):
            continue
        spec = "spec" if len(policy.rules) == 1 else f"specs[{rule_index}]"
        for item_index, item in enumerate(section):
            origin = f"{policy.key} {spec}.{section_name}[{item_index}]"
            peers = context.select_peers(item.peers, policy.namespace)
            if peers is not None and not peers:
                continue
            if not item.to_ports:
                if item.peers.any_peer:
                    continue  # `{}`: no peer and no port named -- allows (or denies) nothing, as in Cilium
                action = DENY if deny else ALLOW
                grants += [_Grant(peers, protocol, *ALL_PORTS, action, (), origin) for protocol in PROTOCOLS]
                continue
            for port_rule in item.to_ports:
                action = DENY if deny else ALLOW if port_rule.http is None else REDIRECT
                http: tuple[HttpRule, ...] = ()
                if action == REDIRECT:
                    # `http: []` and `http: [{}]` both let every request through the proxy.
                    http = _resolve_http(port_rule.http or (HttpRule(),), context, policy.key)
                    if not http:
                        continue  # every HTTP rule needs a missing Secret: this item allows nothing
                ports = port_rule.ports or (PortProtocol(*ALL_PORTS, "ANY"),)
                for port in ports:
                    for grant_peers, protocol, low, high in _port_grants(port, peers, direction, subject, context):
                        grants.append(_Grant(grant_peers, protocol, low, high, action, http, origin))
    return grants


def _selecting_policies(policies: list[Policy], local: list[Endpoint], context: _Context) -> dict[str, list[Policy]]:
    """For each pod of this node, the policies (in order) with a rule selecting it: only those can grant it
    anything. A selector with matchLabels is tried only on the pods carrying its first label (an index),
    which makes 5,000 rules over 110 pods several times faster to compile than trying every pair."""
    by_label: dict[tuple[str, str], list[Endpoint]] = defaultdict(list)
    for endpoint in local:
        for pair in context.endpoint_labels[endpoint.key].items():
            by_label[pair].append(endpoint)
    selecting: dict[str, list[Policy]] = {endpoint.key: [] for endpoint in local}
    for policy in policies:
        chosen: set[str] = set()
        for rule in policy.rules:
            selector = rule.endpoint_selector
            candidates = by_label.get(selector.match_labels[0], []) if selector.match_labels else local
            chosen.update(e.key for e in candidates if _subject_selected(policy, selector, e, context))
        for key in chosen:
            selecting[key].append(policy)
    return selecting


def _subject_selected(policy: Policy, selector: LabelSelector, endpoint: Endpoint, context: _Context) -> bool:
    if policy.kind != CCNP and policy.namespace != endpoint.namespace:
        return False
    return selector.matches(context.endpoint_labels[endpoint.key])


def _resolve(grants: list[_Grant]) -> tuple[PolicyEntry, ...]:
    """Disjoint port intervals per (peer identity, protocol), one action each (see the module docstring)."""
    entries: list[PolicyEntry] = []
    for protocol in PROTOCOLS:
        relevant = [grant for grant in grants if grant.protocol == protocol]
        if not relevant:
            continue
        bounds = sorted({grant.low for grant in relevant} | {grant.high + 1 for grant in relevant})
        intervals = [(low, high - 1) for low, high in itertools.pairwise(bounds)]
        specific = sorted({identity for grant in relevant if grant.peers for identity in grant.peers})
        # Many identities are covered by the same grants (a rule with 8,000 prefixes): combine those once.
        combined: dict[tuple[int, ...], PolicyEntry | None] = {}
        for identity in [ANY_IDENTITY, *specific]:
            previous: PolicyEntry | None = None
            for low, high in intervals:
                covering = [
                    grant for grant in relevant
                    if grant.low <= low and high <= grant.high
                    and (grant.peers is None or (identity != ANY_IDENTITY and identity in grant.peers))
                ]  # fmt: skip
                if identity != ANY_IDENTITY and not any(grant.peers is not None for grant in covering):
                    previous = None
                    continue  # nothing specific: the any-peer entry answers for this identity
                key = (low, *map(id, covering))
                if key not in combined:
                    combined[key] = _combine(identity, protocol, low, high, covering)
                entry = combined[key]
                if entry is not None and entry.peer_identity != identity:
                    entry = PolicyEntry(identity, protocol, low, high, entry.action, entry.http, entry.origins)
                if entry is None:
                    previous = None
                    continue
                if (
                    previous is not None
                    and previous.high + 1 == low
                    and (previous.action, previous.http, previous.origins) == (entry.action, entry.http, entry.origins)
                ):
                    entries[-1] = previous = replace(previous, high=high)
                else:
                    entries.append(entry)
                    previous = entry
    return tuple(entries)


def _combine(identity: int, protocol: str, low: int, high: int, covering: list[_Grant]) -> PolicyEntry | None:
    for action in (DENY, ALLOW, REDIRECT):  # deny wins; an L3/L4 allow shadows L7 rules
        deciding = [grant for grant in covering if grant.action == action]
        if deciding:
            origins = tuple(sorted({grant.origin for grant in deciding}))
            rules = tuple(sorted({rule for grant in deciding for rule in grant.http}, key=repr))
            return PolicyEntry(identity, protocol, low, high, action, rules, origins)
    return None


def compile_plan(
    policies: Iterable[Policy],
    endpoints: Iterable[Endpoint],
    node: Node = Node(),
    secrets: Iterable[Secret] = (),
) -> Plan:
    return Compiler().compile(policies, endpoints, node, secrets)


@dataclass(frozen=True)
class _Population:
    """What depends on the pods, the node and the policies' CIDR prefixes alone: identities and addresses.
    A policy change leaves it as it is."""

    key: tuple[list[Endpoint], Node, frozenset[str]]
    context: _Context
    identities: tuple[Identity, ...]
    ipcache: tuple[tuple[str, int], ...]
    addresses: tuple[tuple[int, AddressSet], ...]


@dataclass(frozen=True)
class _CompiledEndpoint:
    selecting: tuple[Policy, ...]  # the policies it was compiled from
    policy: EndpointPolicy
    problems: tuple[str, ...]


class Compiler:
    """compile_plan with a memory of the previous compile, for an agent that compiles after every change: a
    policy change recompiles only the pods whose selecting policies changed, and reuses the identities and
    addresses (10,000 pods' worth) while no pod, node address or CIDR prefix changed. Unchanged parts of the
    result are the previous objects, which lets rendering skip them too. Same result as a fresh compile."""

    def __init__(self) -> None:
        self._population: _Population | None = None
        self._endpoints: dict[str, _CompiledEndpoint] = {}

    def compile(
        self,
        policies: Iterable[Policy],
        endpoints: Iterable[Endpoint],
        node: Node = Node(),
        secrets: Iterable[Secret] = (),
    ) -> Plan:
        endpoint_list = sorted(endpoints, key=lambda endpoint: endpoint.key)
        policy_list = sorted(policies, key=lambda policy: (policy.key, policy.file))
        # Lists compare item by item with an identity shortcut: unchanged pods cost a pointer comparison each.
        key = (endpoint_list, node, frozenset(_cidr_prefixes(policy_list)))
        secrets_by_key = {secret.key: secret for secret in secrets}
        population = self._population
        if population is None or population.key != key or population.context.secrets != secrets_by_key:
            population = self._population = _population(key, secrets_by_key)
            self._endpoints = {}
        context = population.context

        local = [endpoint for endpoint in endpoint_list if endpoint.local]
        selecting_by_endpoint = _selecting_policies(policy_list, local, context)
        compiled: dict[str, _CompiledEndpoint] = {}
        for endpoint in local:
            selecting = tuple(selecting_by_endpoint[endpoint.key])
            previous = self._endpoints.get(endpoint.key)
            if previous is None or previous.selecting != selecting:
                context.problems = []
                policy = _compile_endpoint(endpoint, selecting, context)
                previous = _CompiledEndpoint(selecting, policy, tuple(context.problems))
            compiled[endpoint.key] = previous
        self._endpoints = compiled
        return Plan(
            identities=population.identities,
            endpoints=tuple(entry.policy for entry in compiled.values()),
            ipcache=population.ipcache,
            addresses=population.addresses,
            problems=tuple(sorted({problem for entry in compiled.values() for problem in entry.problems})),
        )


def _population(key: tuple[list[Endpoint], Node, frozenset[str]], secrets: dict[str, Secret]) -> _Population:
    endpoint_list, node, prefixes = key
    identities, endpoint_identity = _identities(endpoint_list, node, set(prefixes))
    ipcache = _ipcache(identities, endpoint_list, endpoint_identity, node)
    return _Population(
        key=key,
        context=_Context(identities, endpoint_list, endpoint_identity, secrets),
        identities=tuple(sorted(identities, key=lambda identity: identity.number)),
        ipcache=tuple(sorted(ipcache.items())),
        addresses=tuple(sorted(_addresses(identities, ipcache).items())),
    )


def _compile_endpoint(endpoint: Endpoint, selecting: tuple[Policy, ...], context: _Context) -> EndpointPolicy:
    directions: dict[str, DirectionPolicy] = {}
    selected_by: set[tuple[str, str]] = set()
    for direction in DIRECTIONS:
        enforced = False
        grants: list[_Grant] = []
        for policy in selecting:
            for rule in policy.rules:
                if not _subject_selected(policy, rule.endpoint_selector, endpoint, context):
                    continue
                if rule.section(direction, False) is not None or rule.section(direction, True) is not None:
                    selected_by.add((policy.key, direction))
                    enforced = enforced or rule.default_deny(direction)
            for deny in (False, True):
                grants += _grants(policy, direction, deny, endpoint, context)
        if not enforced:
            # Not in default deny: everything is allowed but what a deny rule names; L7 rules cannot
            # deny anything here, so nothing goes to the proxy.
            grants = [grant for grant in grants if grant.action == DENY]
        directions[direction] = DirectionPolicy(enforced, _resolve(grants))
    return EndpointPolicy(
        endpoint,
        context.endpoint_identity[endpoint.key],
        directions[INGRESS],
        directions[EGRESS],
        tuple(sorted(selected_by)),
    )
