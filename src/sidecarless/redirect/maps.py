"""Plan -> BPF map entries. Pure: the agent syncs these into the kernel maps (redirect/bpf.py).

Mirrors bpf/sidecarless.h. A redirect entry is rendered only for (pod, direction) pairs whose Envoy
configuration has been ACKed: until then that traffic is dropped as "Proxy unavailable", never forwarded
unchecked.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecarless.policy.model import EGRESS, INGRESS
from sidecarless.policy.plan import ALLOW, DENY, NONE, REDIRECT, Plan, PolicyEntry

PROTOCOL_NUMBERS = {"ICMP": 1, "TCP": 6, "UDP": 17, "SCTP": 132}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOL_NUMBERS.items()}
DIRECTION_NUMBERS = {INGRESS: 0, EGRESS: 1}
ENDPOINT_ENFORCE = {INGRESS: 1, EGRESS: 2}
ENDPOINT_AUDIT_SHIFT = 2  # SCL_ENDPOINT_AUDIT_SHIFT: the direction's entries carry an audit action
ENDPOINT_AUDIT_ENFORCE_SHIFT = 4  # SCL_ENDPOINT_AUDIT_ENFORCE_SHIFT: the audit verdict is in default deny there
ACTION_NONE = 0
ACTION_ALLOW = 1
ACTION_REDIRECT = 2
ACTION_PROXY_UNAVAILABLE = 3
ACTION_DENY = 4
ACTION_NAMES = {ACTION_NONE: "none", ACTION_ALLOW: "allow", ACTION_REDIRECT: "redirect",
                ACTION_PROXY_UNAVAILABLE: "proxy-unavailable", ACTION_DENY: "deny"}  # fmt: skip
# bpf/sidecarless.h SCL_DROP_*, named as Cilium names its drop reasons where it has one.
DROP_REASONS = {
    1: "Policy denied",
    2: "Proxy unavailable",
    3: "Policy denied by denylist",
    4: "Invalid source ip",
    5: "Unsupported L3 protocol",
    6: "VLAN traffic disallowed",
    7: "Invalid packet",
    8: "Fragment of an unknown datagram",
    9: "Flow moved to the proxy",
    10: "Invalid IPv6 extension header",
    11: "Forbidden ICMPv6 message",
}
MARK_TO_PROXY = 0x200
MARK_FROM_PROXY = 0xA00  # SO_MARK of Envoy's egress upstream connections (bpf/sidecarless.h)
MARK_MASK = 0xF00
POLICY_FIXED_BITS = 80
# The kernel holds every address in 16 bytes, IPv4 mapped into ::ffff:0:0/96 (bpf/sidecarless.h scl_addr).
IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
IPV4_MAPPED_BITS = 96


@dataclass(frozen=True, order=True)
class PolicyKey:
    endpoint: int  # the pod's endpoint id (EndpointValue.id): one set of entries for both its addresses
    peer_identity: int
    direction: int
    protocol: int
    port: int  # the first port of an aligned block
    port_bits: int  # how many leading bits of the port the block fixes (16: one port, 0: all)


@dataclass(frozen=True)
class PolicyValue:
    action: int
    proxy_port: int
    audit_action: int = 0  # read only in an audited direction (EndpointValue.flags)
    hit_index: int = 0  # its rule items' counters (assign_hit_indexes); 0: none


@dataclass(frozen=True)
class EndpointValue:
    identity: int
    flags: int
    ifindex: int = 0  # the node side of the pod's veth: flows between two pods of the node go veth to veth
    id: int = 0  # keys the pod's policy entries


@dataclass(frozen=True)
class InterfaceValue:
    """A pod's veth (node side): the only sources its packets may carry, per family (empty: none)."""

    ip4: str = ""
    ip6: str = ""


@dataclass(frozen=True)
class MapEntries:
    endpoints: dict[str, EndpointValue]  # each address of a pod, both families
    ipcache: dict[str, int]  # prefix -> identity
    policy: dict[PolicyKey, PolicyValue]
    interfaces: dict[int, InterfaceValue] = field(default_factory=dict)  # by ifindex


@dataclass(frozen=True)
class MapSizes:
    """How many entries each kernel map holds (agent flags; bpf/sidecarless.h has the same defaults)."""

    endpoints: int = 4096
    ipcache: int = 65536
    policy: int = 262144
    conntrack: int = 65536


@dataclass(frozen=True)
class ConntrackTimeouts:
    """Seconds a tracked flow lives after its last packet (Cilium's --bpf-ct-timeout-regular-* defaults)."""

    tcp: int = 21600  # established
    tcp_syn: int = 60  # opened, no reply yet
    tcp_fin: int = 10  # a FIN or RST went by
    any: int = 60  # UDP, SCTP, ICMP


DEFAULT_MAP_SIZES = MapSizes()
DEFAULT_CONNTRACK_TIMEOUTS = ConntrackTimeouts()


@functools.lru_cache(maxsize=4096)
def port_blocks(low: int, high: int) -> list[tuple[int, int]]:
    """A port range as aligned blocks (first port, fixed leading bits), as an LPM trie holds it."""
    blocks = []
    port = low
    while port <= high:
        size_bits = 0
        while size_bits < 16 and port % (1 << (size_bits + 1)) == 0 and port + (1 << (size_bits + 1)) - 1 <= high:
            size_bits += 1
        blocks.append((port, 16 - size_bits))
        port += 1 << size_bits
    return blocks


RedirectKey = tuple[str, str, int, str, int, int]  # pod key, direction, peer identity, protocol, low, high


def redirect_key(pod: str, direction: str, entry: PolicyEntry) -> RedirectKey:
    """What a redirect is about, whatever its HTTP rules: a change of rules keeps the redirect on (the old
    rules in force until Envoy ACKs the new), a new port or peer waits for its own ACK."""
    return (pod, direction, entry.peer_identity, entry.protocol, entry.low, entry.high)


def endpoint_ids(plan: Plan) -> dict[str, int]:
    """Pod key -> endpoint id, the key of its policy entries: a hash of the key, so a pod keeps its id (and its
    entries stay in place) while others come and go; a collision takes the next free number."""
    ids: dict[str, int] = {}
    used: set[int] = set()
    for pod in sorted(endpoint.endpoint.key for endpoint in plan.endpoints):
        candidate = zlib.crc32(pod.encode()) or 1
        while candidate in used:
            candidate = candidate % 0xFFFFFFFF + 1
        ids[pod] = candidate
        used.add(candidate)
    return ids


_ACTIONS = {NONE: ACTION_NONE, ALLOW: ACTION_ALLOW, REDIRECT: ACTION_REDIRECT, DENY: ACTION_DENY}


HITS_MAX = 65536  # bpf/sidecarless.h SCL_HITS_MAX


def assign_hit_indexes(plan: Plan, previous: Mapping[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
    """A counter index for each set of rule items that decides an entry: the one it had (its counts go on),
    else the lowest free one; 0 (not counted) once all are taken."""
    wanted = sorted(
        {e.origins for ep in plan.endpoints for d in (ep.ingress, ep.egress) for e in d.entries if e.origins}
    )
    kept = {origins: index for origins, index in previous.items() if origins in set(wanted)}
    used = set(kept.values())
    free = (index for index in range(1, HITS_MAX) if index not in used)
    return {origins: kept[origins] if origins in kept else next(free, 0) for origins in wanted}


def _policy_value(entry: PolicyEntry, redirectable: bool, proxy_port: int, hit_index: int) -> PolicyValue:
    """A redirect Envoy cannot take yet is dropped ("Proxy unavailable"), never let through unchecked; but one
    that goes to Envoy only for the audit verdict is allowed meanwhile: the enforced verdict allows it."""
    audit_action = _ACTIONS[entry.audit.action] if entry.audit is not None else 0
    if entry.action != REDIRECT:
        return PolicyValue(_ACTIONS[entry.action], 0, audit_action, hit_index)
    if redirectable:
        return PolicyValue(ACTION_REDIRECT, proxy_port, audit_action, hit_index)
    if entry.audit is not None and entry.audit.proxied_for_audit:
        return PolicyValue(ACTION_ALLOW, 0, audit_action, hit_index)
    return PolicyValue(ACTION_PROXY_UNAVAILABLE, 0, audit_action, hit_index)


def render_maps(
    plan: Plan,
    proxy_ports: Mapping[str, int],
    redirectable: frozenset[RedirectKey],
    interface_indexes: Mapping[str, int] | None = None,
    hit_indexes: Mapping[tuple[str, ...], int] | None = None,
) -> MapEntries:
    """`redirectable` holds the redirect entries Envoy has ACKed a listener chain and routes for;
    `interface_indexes` the pods' interfaces the programs are attached to, by name; `hit_indexes` the
    counters of each set of rule items (assign_hit_indexes)."""
    hits = hit_indexes or {}
    indexes = interface_indexes or {}
    ids = endpoint_ids(plan)
    endpoints: dict[str, EndpointValue] = {}
    interfaces: dict[int, InterfaceValue] = {}
    policy: dict[PolicyKey, PolicyValue] = {}
    for endpoint in plan.endpoints:
        pod = endpoint.endpoint.key
        index = indexes.get(endpoint.endpoint.interface, 0)
        flags = 0
        for direction in (INGRESS, EGRESS):
            rules = endpoint.direction(direction)
            if rules.enforced:
                flags |= ENDPOINT_ENFORCE[direction]
            if rules.audit_enforced is not None:
                flags |= ENDPOINT_ENFORCE[direction] << ENDPOINT_AUDIT_SHIFT
                if rules.audit_enforced:
                    flags |= ENDPOINT_ENFORCE[direction] << ENDPOINT_AUDIT_ENFORCE_SHIFT
            for entry in rules.entries:
                redirect = redirect_key(pod, direction, entry) in redirectable
                value = _policy_value(entry, redirect, proxy_ports[direction], hits.get(entry.origins, 0))
                for port, bits in port_blocks(entry.low, entry.high):
                    key = PolicyKey(
                        ids[pod],
                        entry.peer_identity,
                        DIRECTION_NUMBERS[direction],
                        PROTOCOL_NUMBERS[entry.protocol],
                        port,
                        bits,
                    )
                    policy[key] = value
        for ip in endpoint.endpoint.ips:
            endpoints[ip] = EndpointValue(endpoint.identity, flags, index, ids[pod])
        if index and endpoint.endpoint.local:
            interfaces[index] = InterfaceValue(endpoint.endpoint.ip, endpoint.endpoint.ip6)
    return MapEntries(endpoints, dict(plan.ipcache), policy, interfaces)


MAP_FLAGS = {
    "scl_endpoints": "--bpf-endpoints-map-max",
    "scl_ipcache": "--bpf-ipcache-map-max",
    "scl_policy": "--bpf-policy-map-max",
}


def capacity_problems(plan: Plan, sizes: MapSizes, locations: Mapping[str, str] | None = None) -> list[str]:
    """Why the maps could not hold `plan`, one line per map that would overflow; empty if it fits. A plan that
    does not fit is rejected whole before the kernel is touched. `locations`: policy key -> file:line."""
    problems = []
    needed = {
        "scl_endpoints": sum(len(endpoint.endpoint.ips) for endpoint in plan.endpoints),
        "scl_ipcache": len(plan.ipcache),
        "scl_policy": 0,
    }
    by_pod: dict[str, int] = {}
    by_pod_policy: dict[str, Counter[str]] = {}
    for endpoint in plan.endpoints:
        origins: Counter[str] = Counter()
        count = 0
        for direction in (INGRESS, EGRESS):
            for entry in endpoint.direction(direction).entries:
                blocks = len(port_blocks(entry.low, entry.high))
                count += blocks
                for policy in {origin.split(" ", 1)[0] for origin in entry.origins}:
                    origins[policy] += blocks
        by_pod[endpoint.endpoint.key] = count
        by_pod_policy[endpoint.endpoint.key] = origins
        needed["scl_policy"] += count
    size_of = {"scl_endpoints": sizes.endpoints, "scl_ipcache": sizes.ipcache, "scl_policy": sizes.policy}
    for name, count in needed.items():
        size = size_of[name]
        if count <= size:
            continue
        detail = ""
        if name == "scl_policy":
            pod, pod_count = max(by_pod.items(), key=lambda item: item[1])
            detail = f": pod {pod} needs {pod_count:,}"
            if by_pod_policy[pod]:
                policy, policy_count = by_pod_policy[pod].most_common(1)[0]
                where = f" ({locations[policy]})" if locations and policy in locations else ""
                detail += f", {policy_count:,} of them for policy {policy}{where}"
        elif name == "scl_ipcache":
            detail = ": addresses of pods and nodes, and the policies' CIDR prefixes"
        problems.append(f"map {name} holds {size:,} entries ({MAP_FLAGS[name]}) and would need {count:,}{detail}")
    return problems


def address_bytes(ip: str) -> bytes:
    """An address as the kernel's maps hold it: 16 bytes, network order, IPv4 mapped."""
    address = ipaddress.ip_address(ip)
    return IPV4_MAPPED_PREFIX + address.packed if address.version == 4 else address.packed


def address_text(data: bytes) -> str:
    """The 16 bytes of an address as text: a mapped IPv4 address as plain IPv4."""
    address = ipaddress.IPv6Address(bytes(data))
    return str(address.ipv4_mapped or address)


def ipcache_key_bytes(prefix: str) -> bytes:
    """bpf/sidecarless.h struct scl_ipcache_key for a prefix of either family."""
    network = ipaddress.ip_network(prefix)
    length = network.prefixlen + (IPV4_MAPPED_BITS if network.version == 4 else 0)
    return struct.pack("<I", length) + address_bytes(str(network.network_address))


def ipcache_prefix(data: bytes) -> str:
    (length,) = struct.unpack_from("<I", data)
    address = ipaddress.IPv6Address(bytes(data[4:20]))
    if address.ipv4_mapped is not None and length >= IPV4_MAPPED_BITS:
        return f"{address.ipv4_mapped}/{length - IPV4_MAPPED_BITS}"
    return f"{address}/{length}"


# struct scl_policy_key: prefixlen, endpoint_id, peer_identity, direction, protocol (host order), port (network).
_POLICY_KEY = struct.Struct("<IIIBB")


def policy_key_bytes(key: PolicyKey) -> bytes:
    head = _POLICY_KEY.pack(POLICY_FIXED_BITS + key.port_bits, key.endpoint, key.peer_identity, key.direction,
                            key.protocol)  # fmt: skip
    return head + key.port.to_bytes(2, "big")


def policy_key_of(data: bytes) -> PolicyKey:
    prefixlen, endpoint, peer, direction, protocol = _POLICY_KEY.unpack_from(data)
    port = int.from_bytes(data[_POLICY_KEY.size : _POLICY_KEY.size + 2], "big")
    return PolicyKey(endpoint, peer, direction, protocol, port, prefixlen - POLICY_FIXED_BITS)


# struct scl_endpoint_info: identity, flags, ifindex, id.
_ENDPOINT_VALUE = struct.Struct("<IIII")
# struct scl_policy_entry: action, audit_action, proxy_port (host order), hit_index.
_POLICY_VALUE = struct.Struct("<BBHI")


def endpoint_value_bytes(value: EndpointValue) -> bytes:
    return _ENDPOINT_VALUE.pack(value.identity, value.flags, value.ifindex, value.id)


def endpoint_value_of(data: bytes) -> EndpointValue:
    return EndpointValue(*_ENDPOINT_VALUE.unpack(data))


def policy_value_bytes(value: PolicyValue) -> bytes:
    return _POLICY_VALUE.pack(value.action, value.audit_action, value.proxy_port, value.hit_index)


def policy_value_of(data: bytes) -> PolicyValue:
    action, audit_action, proxy_port, hit_index = _POLICY_VALUE.unpack(data)
    return PolicyValue(action, proxy_port, audit_action, hit_index)


def interface_value_bytes(value: InterfaceValue, flags: int) -> bytes:
    """struct scl_interface_info: flags, the IPv4 address (0: none), the IPv6 address (all zero: none)."""
    ip4 = ipaddress.IPv4Address(value.ip4).packed if value.ip4 else bytes(4)
    ip6 = ipaddress.IPv6Address(value.ip6).packed if value.ip6 else bytes(16)
    return struct.pack("<I", flags) + ip4 + ip6


def interface_value_of(data: bytes) -> InterfaceValue:
    ip4, ip6 = bytes(data[4:8]), bytes(data[8:24])
    return InterfaceValue(
        str(ipaddress.IPv4Address(ip4)) if any(ip4) else "", str(ipaddress.IPv6Address(ip6)) if any(ip6) else ""
    )


def port_to_network_order(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def port_from_network_order(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


# bpf/from_pod.bpf.c: its two TC programs, and the ring buffer they report events in.
FROM_POD, TO_POD = "from_pod", "to_pod"
PROGRAM_NAMES = (FROM_POD, TO_POD)
PROGRAM_FILE = "from_pod.bpf.c"
# bpf/sockets.bpf.c: socket acceleration, its programs, the socket map they share, and each socket's own state.
SOCKETS_FILE = "sockets.bpf.c"
SOCK_OPS, SK_MSG, SOCKETS_MAP, SOCKET_STORAGE_MAP = "scl_sock_ops", "scl_sk_msg", "scl_sockets", "scl_socket_on_stack"
# bpf/sidecarless.h: the maps every build of the programs shares, pinned in the maps' directory.
SHARED_MAPS = ("scl_endpoints", "scl_interfaces", "scl_ipcache", "scl_policy", "scl_conntrack", "scl_fragments",
               "scl_counters", "scl_hits", "scl_config")  # fmt: skip
EVENTS_MAP = "scl_events"

KERNEL_EVENT_DROP = 1
KERNEL_EVENT_VERDICT = 2
KERNEL_EVENT_AUDIT = 3


@dataclass(frozen=True)
class KernelEvent:
    """A drop, or the policy verdict for a new flow, as the TC program reported it."""

    timestamp_ns: int
    source_ip: str
    destination_ip: str
    source_port: int
    destination_port: int
    source_identity: int
    destination_identity: int
    ifindex: int
    protocol: int
    reason: int
    tcp_flags: int
    direction: int
    kind: int  # 1 drop, 2 policy verdict, 3 audit
    action: int  # for a verdict: 1 allow, 2 redirect
    ethertype: int = 0x0800
    # For an audit event, what the audit verdict does: dropped (reason), or let through (action).
    audit_reason: int = 0
    audit_action: int = 0
    audit_direction: int = 0
