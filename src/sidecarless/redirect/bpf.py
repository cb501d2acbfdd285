"""BPF programs and maps, through BCC. The only module that imports bcc.

The program is compiled from bpf/from_pod.bpf.c at load time; its maps are pinned under `pin_dir` (bpffs), so
they are shared by every load and outlive the agent.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bcc import BPF

from sidecarless.redirect.maps import (
    POLICY_FIXED_BITS,
    EndpointValue,
    MapEntries,
    PolicyKey,
    PolicyValue,
    ip_from_network_order,
    ip_to_network_order,
    port_from_network_order,
    port_to_network_order,
)

BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM_FILE = "from_pod.bpf.c"
BPFFS = "/sys/fs/bpf"
COUNTERS = {0: "dropped", 1: "redirected", 2: "events_lost", 3: "direct_flows"}
# bpf/sidecarless.h SCL_CONFIG_*
CONFIG_VERDICT_EVENTS = 0
CONFIG_DIRECT_ROUTING = 1
KERNEL_EVENT_DROP = 1
KERNEL_EVENT_VERDICT = 2


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
    kind: int  # 1 drop, 2 policy verdict
    action: int  # for a verdict: 1 allow, 2 redirect


class _KernelEventStruct(ctypes.Structure):
    _fields_ = [
        ("timestamp_ns", ctypes.c_uint64),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("source_identity", ctypes.c_uint32),
        ("destination_identity", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("protocol", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("kind", ctypes.c_uint8),
        ("action", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class BpfDatapath:
    """The loaded programs and their maps."""

    def __init__(self, pin_dir: str) -> None:
        if not pin_dir.startswith(BPFFS + "/"):
            raise ValueError(f"pin directory {pin_dir} is not under {BPFFS}")
        os.makedirs(pin_dir, exist_ok=True)
        self.pin_dir = pin_dir
        self._bpf = BPF(
            src_file=str(BPF_SOURCE_DIR / PROGRAM_FILE).encode(),
            cflags=[f"-I{BPF_SOURCE_DIR}", f'-DSCL_PIN_DIR="{pin_dir}"'],
        )
        self._from_pod = self._bpf.load_func(b"from_pod", BPF.SCHED_CLS)
        self._to_pod = self._bpf.load_func(b"to_pod", BPF.SCHED_CLS)
        self._endpoints = self._bpf[b"scl_endpoints"]
        self._ipcache = self._bpf[b"scl_ipcache"]
        self._policy = self._bpf[b"scl_policy"]
        self._counters = self._bpf[b"scl_counters"]
        self._config = self._bpf[b"scl_config"]

    @property
    def from_pod(self) -> tuple[int, str]:
        """(fd, name) of the program for TC ingress of a pod's veth (and of the node's other interfaces)."""
        return int(self._from_pod.fd), "from_pod"

    @property
    def to_pod(self) -> tuple[int, str]:
        """(fd, name) of the program for TC egress of a pod's veth."""
        return int(self._to_pod.fd), "to_pod"

    def sync(self, entries: MapEntries) -> None:
        """Make the maps hold exactly `entries`: add and change first, delete last, so a changed policy
        never passes through a state with less than either version allows or denies."""
        current_ipcache = self.ipcache_entries()
        for prefix, identity in entries.ipcache.items():
            if current_ipcache.get(prefix) != identity:
                self._ipcache[self._ipcache_key(prefix)] = self._ipcache.Leaf(identity)
        current_endpoints = self.endpoint_entries()
        for ip, info in entries.endpoints.items():
            if current_endpoints.get(ip) != info:
                self._endpoints[self._endpoints.Key(ip_to_network_order(ip))] = self._endpoints.Leaf(
                    info.identity, info.flags, info.ifindex
                )
        current_policy = self.policy_entries()
        for key, value in entries.policy.items():
            if current_policy.get(key) != value:
                self._policy[self._policy_key(key)] = self._policy.Leaf(value.action, 0, value.proxy_port)
        for key in current_policy.keys() - entries.policy.keys():
            del self._policy[self._policy_key(key)]
        for ip in current_endpoints.keys() - entries.endpoints.keys():
            del self._endpoints[self._endpoints.Key(ip_to_network_order(ip))]
        for prefix in current_ipcache.keys() - entries.ipcache.keys():
            del self._ipcache[self._ipcache_key(prefix)]

    def policy_entries(self) -> dict[PolicyKey, PolicyValue]:
        return {
            PolicyKey(
                ip_from_network_order(key.endpoint_ip),
                key.peer_identity,
                key.direction,
                key.protocol,
                port_from_network_order(key.port),
                key.prefixlen - POLICY_FIXED_BITS,
            ): PolicyValue(value.action, value.proxy_port)
            for key, value in self._policy.items()
        }

    def endpoint_entries(self) -> dict[str, EndpointValue]:
        return {
            ip_from_network_order(key.ip): EndpointValue(value.identity, value.flags, value.ifindex)
            for key, value in self._endpoints.items()
        }

    def ipcache_entries(self) -> dict[str, int]:
        return {
            f"{ip_from_network_order(key.ip)}/{key.prefixlen}": int(value.identity)
            for key, value in self._ipcache.items()
        }

    def map_fill(self) -> dict[str, dict[str, int]]:
        """Entries and capacity of each map (the conntrack table is walked: cheap at lab sizes)."""
        maps = {
            "scl_endpoints": self._endpoints,
            "scl_ipcache": self._ipcache,
            "scl_policy": self._policy,
            "scl_conntrack": self._bpf[b"scl_conntrack"],
        }
        return {
            name: {"entries": sum(1 for _ in table), "max_entries": int(table.max_entries)}
            for name, table in maps.items()
        }

    def set_direct_routing(self, enabled: bool) -> None:
        """Flows between two pods of this node go veth to veth (the fast path), or through the node's stack."""
        self._config[ctypes.c_uint32(CONFIG_DIRECT_ROUTING)] = ctypes.c_uint64(1 if enabled else 0)

    def set_verdict_events(self, enabled: bool) -> None:
        """Report allowed new flows (policy verdicts) in the ring buffer; drops are always reported."""
        self._config[ctypes.c_uint32(CONFIG_VERDICT_EVENTS)] = ctypes.c_uint64(1 if enabled else 0)

    def counters(self) -> dict[str, int]:
        return {name: int(self._counters[ctypes.c_int(index)].value) for index, name in COUNTERS.items()}

    def open_events(self, callback: Callable[[KernelEvent], None]) -> None:
        def handle(_context: object, data: int, _size: int) -> None:
            raw = ctypes.cast(data, ctypes.POINTER(_KernelEventStruct)).contents
            callback(
                KernelEvent(
                    raw.timestamp_ns,
                    ip_from_network_order(raw.saddr),
                    ip_from_network_order(raw.daddr),
                    port_from_network_order(raw.sport),
                    port_from_network_order(raw.dport),
                    raw.source_identity,
                    raw.destination_identity,
                    raw.ifindex,
                    raw.protocol,
                    raw.reason,
                    raw.tcp_flags,
                    raw.direction,
                    raw.kind,
                    raw.action,
                )
            )

        self._bpf[b"scl_events"].open_ring_buffer(handle)

    def poll_events(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)

    def _policy_key(self, key: PolicyKey) -> ctypes.Structure:
        key_type: type[ctypes.Structure] = self._policy.Key
        return key_type(
            POLICY_FIXED_BITS + key.port_bits,
            ip_to_network_order(key.endpoint_ip),
            key.peer_identity,
            key.direction,
            key.protocol,
            port_to_network_order(key.port),
        )

    def _ipcache_key(self, prefix: str) -> ctypes.Structure:
        address, _, length = prefix.partition("/")
        key_type: type[ctypes.Structure] = self._ipcache.Key
        return key_type(int(length), ip_to_network_order(address))
