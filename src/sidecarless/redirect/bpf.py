"""BPF programs and maps, through BCC. The only module that imports bcc.

The program is compiled from bpf/from_pod.bpf.c at load time; its maps are pinned under `pin_dir` (bpffs), so
they are shared by every load and outlive the agent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bcc import BPF, libbcc

from sidecarless.redirect.maps import (
    ACTION_NAMES,
    DEFAULT_MAP_SIZES,
    ConntrackTimeouts,
    EndpointValue,
    InterfaceValue,
    KernelEvent,
    MapEntries,
    MapSizes,
    PolicyKey,
    PolicyValue,
    address_bytes,
    address_text,
    interface_value_bytes,
    interface_value_of,
    ipcache_key_bytes,
    ipcache_prefix,
    policy_key_bytes,
    policy_key_of,
    port_from_network_order,
)

BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM_FILE = "from_pod.bpf.c"
BPFFS = "/sys/fs/bpf"
HEADER_FILE = "sidecarless.h"
CT_FLAGS = {1: "from-node", 2: "seen-reply", 4: "closing", 8: "from-proxy"}  # SCL_CT_*
CT_TICK_SHIFT = 30  # SCL_CT_TICK_SHIFT: conntrack time is CLOCK_MONOTONIC in ticks of 2^30 ns
CT_TICK_S = (1 << CT_TICK_SHIFT) / 1e9
COUNTERS = {0: "dropped", 1: "redirected", 2: "events_lost", 3: "direct_flows", 4: "flows_redecided"}
# bpf/sidecarless.h SCL_CONFIG_*
CONFIG_VERDICT_EVENTS = 0
CONFIG_DIRECT_ROUTING = 1
CONFIG_POLICY_REVISION = 2
CONFIG_CT_TIMEOUT_TCP = 3
CONFIG_CT_TIMEOUT_TCP_SYN = 4
CONFIG_CT_TIMEOUT_TCP_FIN = 5
CONFIG_CT_TIMEOUT_ANY = 6
INTERFACE_POD = 1  # SCL_INTERFACE_POD


class _KernelEventStruct(ctypes.Structure):
    _fields_ = [
        ("timestamp_ns", ctypes.c_uint64),
        ("saddr", ctypes.c_ubyte * 16),
        ("daddr", ctypes.c_ubyte * 16),
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
        ("ethertype", ctypes.c_uint16),
        ("audit_reason", ctypes.c_uint8),
        ("audit_action", ctypes.c_uint8),
        ("audit_direction", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class MapFull(Exception):
    """A kernel map had no room for an entry; the maps hold what was written before it. Retrying helps once
    the wanted set fits (the compiler checks that before anything is written)."""


@functools.lru_cache(maxsize=64)
def maps_dir(pin_dir: str, sizes: MapSizes) -> str:
    """Where this build's maps are pinned: one directory per map layout and size, so an agent whose layout
    or sizes changed starts on new maps instead of reading old ones with new structures."""
    layout = (BPF_SOURCE_DIR / HEADER_FILE).read_bytes() + repr(sizes).encode()
    return f"{pin_dir}/maps-{hashlib.sha256(layout).hexdigest()[:12]}"


IPCACHE_KEY_SIZE = 20  # struct scl_ipcache_key
libbcc.lib.bpf_obj_get.argtypes, libbcc.lib.bpf_obj_get.restype = [ctypes.c_char_p], ctypes.c_int


def pinned_ipcache_identity(pin_dir: str, prefix: str, sizes: MapSizes = DEFAULT_MAP_SIZES) -> int | None:
    """The identity the kernel's ipcache under `pin_dir` gives `prefix` (its longest match), read from the pinned
    map itself, without the agent: a probe that costs the agents nothing (the churn benchmark's)."""
    lib = libbcc.lib
    fd = lib.bpf_obj_get(f"{maps_dir(pin_dir, sizes)}/scl_ipcache".encode())
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"no pinned ipcache under {pin_dir}")
    try:
        key = ctypes.create_string_buffer(ipcache_key_bytes(prefix), IPCACHE_KEY_SIZE)
        value = ctypes.c_uint32()
        found = lib.bpf_lookup_elem(fd, key, ctypes.byref(value)) == 0
    finally:
        os.close(fd)
    return int(value.value) if found else None


def _return_freed_memory() -> None:
    """Compiling takes LLVM about 110 MiB of heap, nearly all freed once the programs are loaded; glibc keeps freed
    memory in its arenas (the agent's RSS stayed there) until asked to give it back."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to ask
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _remove_other_layouts(pin_dir: str, keep: str) -> None:
    """Pins of an older layout: the programs that use those maps keep them until they are replaced."""
    for entry in Path(pin_dir).iterdir():
        if str(entry) == keep:
            continue
        if entry.is_dir() and entry.name.startswith("maps-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith("scl_"):
            entry.unlink(missing_ok=True)


class BpfDatapath:
    """The loaded programs and their maps."""

    def __init__(self, pin_dir: str, sizes: MapSizes = DEFAULT_MAP_SIZES) -> None:
        if not pin_dir.startswith(BPFFS + "/"):
            raise ValueError(f"pin directory {pin_dir} is not under {BPFFS}")
        self.pin_dir = pin_dir
        self.maps_dir = maps_dir(pin_dir, sizes)
        os.makedirs(self.maps_dir, exist_ok=True)
        _remove_other_layouts(pin_dir, self.maps_dir)
        self._bpf = BPF(
            src_file=str(BPF_SOURCE_DIR / PROGRAM_FILE).encode(),
            cflags=[
                f"-I{BPF_SOURCE_DIR}",
                f'-DSCL_PIN_DIR="{self.maps_dir}"',
                f"-DSCL_ENDPOINTS_MAX={sizes.endpoints}",
                f"-DSCL_IPCACHE_MAX={sizes.ipcache}",
                f"-DSCL_POLICY_MAX={sizes.policy}",
                f"-DSCL_CONNTRACK_MAX={sizes.conntrack}",
            ],
        )
        self._from_pod = self._bpf.load_func(b"from_pod", BPF.SCHED_CLS)
        self._to_pod = self._bpf.load_func(b"to_pod", BPF.SCHED_CLS)
        _return_freed_memory()
        self._endpoints = self._bpf[b"scl_endpoints"]
        self._interfaces = self._bpf[b"scl_interfaces"]
        self._ipcache = self._bpf[b"scl_ipcache"]
        self._policy = self._bpf[b"scl_policy"]
        self._conntrack = self._bpf[b"scl_conntrack"]
        self._counters = self._bpf[b"scl_counters"]
        self._hits = self._bpf[b"scl_hits"]
        self._config = self._bpf[b"scl_config"]
        self._held: MapEntries | None = None  # what the maps hold, as last written or read
        self._held_exact = False  # False: a sync failed part way (or none ran yet); read the kernel
        self._conntrack_count: int | None = None  # tracked flows at the last collection

    @property
    def from_pod(self) -> tuple[int, str]:
        """(fd, name) of the program for TC ingress of a pod's veth (and of the node's other interfaces)."""
        return int(self._from_pod.fd), "from_pod"

    @property
    def to_pod(self) -> tuple[int, str]:
        """(fd, name) of the program for TC egress of a pod's veth."""
        return int(self._to_pod.fd), "to_pod"

    def sync(self, entries: MapEntries) -> bool:
        """Make the maps hold exactly `entries`; True if anything changed, and then the policy revision is
        bumped, so every tracked flow is decided again on its next packet. Adds and changes go first, deletes
        last, so a changed policy never passes through a state with less than either version allows or
        denies; a map that cannot hold both versions at once deletes first (never left too full for the next
        sync). Raises MapFull when the wanted entries alone do not fit."""
        changed = False
        endpoints = self._endpoints
        current = self._current()
        self._held_exact = False  # a MapFull leaves the maps part way: read them again before the next sync
        changed |= _sync_table(
            self._ipcache, current.ipcache, entries.ipcache,
            lambda prefix: _from_bytes(self._ipcache.Key, ipcache_key_bytes(prefix)),
            lambda identity: self._ipcache.Leaf(identity),
        )  # fmt: skip
        changed |= _sync_table(
            endpoints, current.endpoints, entries.endpoints,
            lambda ip: _from_bytes(endpoints.Key, address_bytes(ip)),
            lambda info: endpoints.Leaf(info.identity, info.flags, info.ifindex, info.id),
        )  # fmt: skip
        changed |= _sync_table(
            self._interfaces, current.interfaces, entries.interfaces, ctypes.c_uint32,
            lambda value: _from_bytes(self._interfaces.Leaf, interface_value_bytes(value, INTERFACE_POD)),
        )  # fmt: skip
        changed |= _sync_table(
            self._policy, current.policy, entries.policy,
            lambda key: _from_bytes(self._policy.Key, policy_key_bytes(key)),
            lambda value: self._policy.Leaf(value.action, value.audit_action, value.proxy_port, value.hit_index),
        )  # fmt: skip
        if changed:
            revision = ctypes.c_uint32(CONFIG_POLICY_REVISION)
            self._config[revision] = ctypes.c_uint64(int(self._config[revision].value) + 1)
        self._held, self._held_exact = entries, True
        return changed

    def _current(self) -> MapEntries:
        """What the maps hold: as this agent last wrote them, or read from the kernel (after a start, or a sync
        that failed part way). Only the agent writes them (one sync at a time, from its reconcile thread), and
        reading 8,000 entries back costs as many syscalls, each of which waits for the GIL while a compile runs."""
        if self._held is None or not self._held_exact:
            self._held, self._held_exact = self._read_maps(), True
        return self._held

    def _read_maps(self) -> MapEntries:
        return MapEntries(
            self.endpoint_entries(), self.ipcache_entries(), self.policy_entries(), self.interface_entries()
        )

    def interface_entries(self) -> dict[int, InterfaceValue]:
        return {int(key.value): interface_value_of(bytes(value)) for key, value in self._interfaces.items()}

    def set_conntrack_timeouts(self, timeouts: ConntrackTimeouts) -> None:
        for index, seconds in (
            (CONFIG_CT_TIMEOUT_TCP, timeouts.tcp),
            (CONFIG_CT_TIMEOUT_TCP_SYN, timeouts.tcp_syn),
            (CONFIG_CT_TIMEOUT_TCP_FIN, timeouts.tcp_fin),
            (CONFIG_CT_TIMEOUT_ANY, timeouts.any),
        ):
            self._config[ctypes.c_uint32(index)] = ctypes.c_uint64(max(1, math.ceil(seconds / CT_TICK_S)))

    def collect_conntrack(self) -> int:
        """Remove expired flows (the program ignores them already; this keeps the table from filling with
        them). Returns how many were removed."""
        now = _now_ticks()
        entries = list(self._conntrack.items())
        expired = [key for key, entry in entries if entry.expires < now]
        self._conntrack_count = len(entries) - len(expired)
        removed = 0
        for key in expired:
            try:
                del self._conntrack[key]
                removed += 1
            except KeyError:
                pass  # gone meanwhile (the program or the LRU removed it)
        return removed

    def conntrack_entries(self) -> Iterator[dict[str, Any]]:
        """The tracked flows, as `bpf ct list` shows them."""
        now = _now_ticks()
        for key, entry in self._conntrack.items():
            yield {
                "source": _endpoint_text(bytes(key.saddr), port_from_network_order(key.sport)),
                "destination": _endpoint_text(bytes(key.daddr), port_from_network_order(key.dport)),
                "protocol": int(key.protocol),
                "action": ACTION_NAMES.get(int(entry.action), str(int(entry.action))),
                "flags": ",".join(name for bit, name in CT_FLAGS.items() if entry.flags & bit) or "-",
                "revision": int(entry.revision),
                "expires_in_s": round((int(entry.expires) - now) * CT_TICK_S, 1),
            }

    def policy_entries(self) -> dict[PolicyKey, PolicyValue]:
        policy = self._policy.items()
        return {
            policy_key_of(bytes(key)): PolicyValue(value.action, value.proxy_port, value.audit_action, value.hit_index)
            for key, value in policy
        }

    def endpoint_entries(self) -> dict[str, EndpointValue]:
        return {
            address_text(bytes(key)): EndpointValue(value.identity, value.flags, value.ifindex, value.id)
            for key, value in self._endpoints.items()
        }

    def ipcache_entries(self) -> dict[str, int]:
        return {ipcache_prefix(bytes(key)): int(value.identity) for key, value in self._ipcache.items()}

    def map_fill(self) -> dict[str, dict[str, int]]:
        """Entries and capacity of each map, without walking them (status and metrics ask often): what the
        agent wrote, and the tracked flows as the last collection counted them."""
        # During a sync, the counts before it; never stored from here: a read racing a sync would leave the
        # next sync a stale view.
        held = self._held or self._read_maps()
        if self._conntrack_count is None:
            self._conntrack_count = sum(1 for _ in self._conntrack)
        counts = {
            "scl_endpoints": (len(held.endpoints), self._endpoints),
            "scl_interfaces": (len(held.interfaces), self._interfaces),
            "scl_ipcache": (len(held.ipcache), self._ipcache),
            "scl_policy": (len(held.policy), self._policy),
            "scl_conntrack": (self._conntrack_count, self._conntrack),
        }
        return {
            name: {"entries": count, "max_entries": int(table.max_entries)} for name, (count, table) in counts.items()
        }

    def set_direct_routing(self, enabled: bool) -> None:
        """Flows between two pods of this node go veth to veth (the fast path), or through the node's stack."""
        self._config[ctypes.c_uint32(CONFIG_DIRECT_ROUTING)] = ctypes.c_uint64(1 if enabled else 0)

    def set_verdict_events(self, enabled: bool) -> None:
        """Report allowed new flows (policy verdicts) in the ring buffer; drops are always reported."""
        self._config[ctypes.c_uint32(CONFIG_VERDICT_EVENTS)] = ctypes.c_uint64(1 if enabled else 0)

    def hit_counts(self, indexes: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Flows (allowed, denied) counted on each rule-item counter index (bpf/sidecarless.h scl_hits)."""
        return {
            index: (
                int(self._hits[ctypes.c_uint32(2 * index)].value),
                int(self._hits[ctypes.c_uint32(2 * index + 1)].value),
            )
            for index in indexes
        }

    def reset_hits(self, indexes: Iterable[int]) -> None:
        """Zero counters before they are given to other rule items."""
        for index in indexes:
            for slot in (2 * index, 2 * index + 1):
                self._hits[ctypes.c_uint32(slot)] = ctypes.c_uint64(0)

    def counters(self) -> dict[str, int]:
        return {name: int(self._counters[ctypes.c_int(index)].value) for index, name in COUNTERS.items()}

    def open_events(self, callback: Callable[[KernelEvent], None]) -> None:
        def handle(_context: object, data: int, _size: int) -> None:
            raw = ctypes.cast(data, ctypes.POINTER(_KernelEventStruct)).contents
            callback(
                KernelEvent(
                    raw.timestamp_ns,
                    address_text(bytes(raw.saddr)),
                    address_text(bytes(raw.daddr)),
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
                    port_from_network_order(raw.ethertype),
                    raw.audit_reason,
                    raw.audit_action,
                    raw.audit_direction,
                )
            )

        self._bpf[b"scl_events"].open_ring_buffer(handle)

    def poll_events(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)


def _from_bytes(struct_type: Any, data: bytes) -> Any:
    """A map's key or value type (BCC's ctypes structure) holding `data`, laid out as bpf/sidecarless.h has it."""
    if ctypes.sizeof(struct_type) != len(data):
        raise ValueError(f"{struct_type.__name__}: {ctypes.sizeof(struct_type)} bytes, given {len(data)}")
    return struct_type.from_buffer_copy(data)


def _endpoint_text(address: bytes, port: int) -> str:
    text = address_text(address)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _sync_table(
    table: Any,
    current: Mapping[Any, Any],
    wanted: Mapping[Any, Any],
    key_of: Callable[[Any], Any],
    leaf_of: Callable[[Any], Any],
) -> bool:
    """One map to exactly `wanted`: writes first, deletes last, unless both sets together would not fit."""
    writes = [key for key, value in wanted.items() if current.get(key) != value]
    deletes = [key for key in current if key not in wanted]
    added = sum(1 for key in writes if key not in current)
    if len(current) + added > int(table.max_entries):
        _delete(table, deletes, key_of)
        deletes = []
    for key in writes:
        try:
            table[key_of(key)] = leaf_of(wanted[key])
        except Exception as error:  # BCC raises a bare Exception carrying the errno text
            if "No space left" in str(error) or getattr(error, "errno", None) == errno.ENOSPC:
                raise MapFull(f"{_name(table)}: no room for {len(wanted)} entries ({table.max_entries} max)") from error
            raise
    _delete(table, deletes, key_of)
    return bool(writes or deletes)


def _delete(table: Any, keys: list[Any], key_of: Callable[[Any], Any]) -> None:
    for key in keys:
        with contextlib.suppress(KeyError):
            del table[key_of(key)]


def _name(table: Any) -> str:
    name = getattr(table, "_name", b"")
    return name.decode() if isinstance(name, bytes) else str(name)


def _now_ticks() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> CT_TICK_SHIFT
