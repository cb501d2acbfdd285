"""Plan -> BPF map entries. Pure: the agent syncs these into the kernel maps (redirect/bpf.py).

Mirrors bpf/sidecarless.h. A redirect entry is rendered only for (pod, port) pairs whose Envoy configuration
has been ACKed: until then that port's traffic is dropped as "Proxy unavailable", never forwarded unchecked.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sidecarless.policy.compile import Plan

PROTOCOL_NUMBERS = {"ICMP": 1, "TCP": 6, "UDP": 17}
ENDPOINT_ENFORCE_INGRESS = 1
ACTION_ALLOW = 1
ACTION_REDIRECT = 2
ACTION_PROXY_UNAVAILABLE = 3
DROP_REASONS = {1: "Policy denied", 2: "Proxy unavailable"}
MARK_TO_PROXY = 0x200
MARK_MASK = 0xF00


@dataclass(frozen=True, order=True)
class PolicyKey:
    endpoint_ip: str
    peer_identity: int
    port: int  # 0 = every port
    protocol: int


@dataclass(frozen=True)
class PolicyValue:
    action: int
    proxy_port: int


@dataclass(frozen=True)
class EndpointValue:
    identity: int
    flags: int


@dataclass(frozen=True)
class MapEntries:
    endpoints: dict[str, EndpointValue]
    policy: dict[PolicyKey, PolicyValue]


def render_maps(plan: Plan, proxy_port: int, redirectable: frozenset[tuple[str, int]]) -> MapEntries:
    """`redirectable` holds (pod IP, port) pairs whose listener chain and routes Envoy has ACKed."""
    endpoints: dict[str, EndpointValue] = {}
    policy: dict[PolicyKey, PolicyValue] = {}
    for endpoint in plan.endpoints:
        ip = endpoint.endpoint.ip
        flags = ENDPOINT_ENFORCE_INGRESS if endpoint.ingress_enforced else 0
        endpoints[ip] = EndpointValue(endpoint.identity, flags)
        if not endpoint.ingress_enforced:
            continue
        for allow in endpoint.kernel:
            key = PolicyKey(ip, allow.peer_identity, allow.port, PROTOCOL_NUMBERS[allow.protocol])
            if not allow.redirect:
                policy[key] = PolicyValue(ACTION_ALLOW, 0)
            elif (ip, allow.port) in redirectable:
                policy[key] = PolicyValue(ACTION_REDIRECT, proxy_port)
            else:
                policy[key] = PolicyValue(ACTION_PROXY_UNAVAILABLE, 0)
    return MapEntries(endpoints, policy)


def ip_to_network_order(ip: str) -> int:
    """The u32 that holds `ip` in network byte order, as read on a little-endian host."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def ip_from_network_order(value: int) -> str:
    return str(ipaddress.IPv4Address(value.to_bytes(4, "little")))
