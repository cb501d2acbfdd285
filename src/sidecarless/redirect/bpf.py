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
    EndpointValue,
    MapEntries,
    PolicyKey,
    PolicyValue,
    ip_from_network_order,
    ip_to_network_order,
)

BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM_FILE = "from_pod.bpf.c"
PROGRAM_FUNCTION = "from_pod"
BPFFS = "/sys/fs/bpf"
COUNTERS = {0: "dropped", 1: "redirected", 2: "events_lost"}


@dataclass(frozen=True)
class DropEvent:
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


class _DropEventStruct(ctypes.Structure):
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
        ("pad", ctypes.c_uint8),
    ]


class BpfDatapath:
    """The loaded program and its maps."""

    def __init__(self, pin_dir: str) -> None:
        if not pin_dir.startswith(BPFFS + "/"):
            raise ValueError(f"pin directory {pin_dir} is not under {BPFFS}")
        os.makedirs(pin_dir, exist_ok=True)
        self.pin_dir = pin_dir
        self._bpf = BPF(
            src_file=str(BPF_SOURCE_DIR / PROGRAM_FILE).encode(),
            cflags=[f"-I{BPF_SOURCE_DIR}", f'-DSCL_PIN_DIR="{pin_dir}"'],
        )
        self._function = self._bpf.load_func(PROGRAM_FUNCTION.encode(), BPF.SCHED_CLS)
        self._endpoints = self._bpf[b"scl_endpoints"]
        self._policy = self._bpf[b"scl_policy"]
        self._counters = self._bpf[b"scl_counters"]

    @property
    def program_fd(self) -> int:
        return int(self._function.fd)

    @property
    def program_name(self) -> str:
        return PROGRAM_FUNCTION

    def sync(self, entries: MapEntries) -> None:
        """Make the maps hold exactly `entries`: add and change first, delete last."""
        current_policy = self.policy_entries()
        for key, value in entries.policy.items():
            if current_policy.get(key) != value:
                self._policy[self._policy_key(key)] = self._policy.Leaf(value.action, 0, value.proxy_port)
        current_endpoints = self.endpoint_entries()
        for ip, info in entries.endpoints.items():
            if current_endpoints.get(ip) != info:
                self._endpoints[self._endpoints.Key(ip_to_network_order(ip))] = self._endpoints.Leaf(
                    info.identity, info.flags
                )
        for key in current_policy.keys() - entries.policy.keys():
            del self._policy[self._policy_key(key)]
        for ip in current_endpoints.keys() - entries.endpoints.keys():
            del self._endpoints[self._endpoints.Key(ip_to_network_order(ip))]

    def policy_entries(self) -> dict[PolicyKey, PolicyValue]:
        return {
            PolicyKey(
                ip_from_network_order(key.endpoint_ip), key.peer_identity, key.port, key.protocol
            ): PolicyValue(value.action, value.proxy_port)
            for key, value in self._policy.items()
        }

    def endpoint_entries(self) -> dict[str, EndpointValue]:
        return {
            ip_from_network_order(key.ip): EndpointValue(value.identity, value.flags)
            for key, value in self._endpoints.items()
        }

    def counters(self) -> dict[str, int]:
        return {name: int(self._counters[ctypes.c_int(index)].value) for index, name in COUNTERS.items()}

    def open_events(self, callback: Callable[[DropEvent], None]) -> None:
        def handle(_context: object, data: int, _size: int) -> None:
            raw = ctypes.cast(data, ctypes.POINTER(_DropEventStruct)).contents
            callback(
                DropEvent(
                    raw.timestamp_ns,
                    ip_from_network_order(raw.saddr),
                    ip_from_network_order(raw.daddr),
                    int.from_bytes(raw.sport.to_bytes(2, "little"), "big"),
                    int.from_bytes(raw.dport.to_bytes(2, "little"), "big"),
                    raw.source_identity,
                    raw.destination_identity,
                    raw.ifindex,
                    raw.protocol,
                    raw.reason,
                    raw.tcp_flags,
                )
            )

        self._bpf[b"scl_events"].open_ring_buffer(handle)

    def poll_events(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)

    def _policy_key(self, key: PolicyKey) -> ctypes.Structure:
        key_type: type[ctypes.Structure] = self._policy.Key
        return key_type(ip_to_network_order(key.endpoint_ip), key.peer_identity, key.port, key.protocol, 0)
