"""BPF programs and maps, without BCC: the programs are compiled once per source, flags and kernel by a
short-lived child (redirect/compile_programs.py) and pinned; the agent opens the pins and works the maps
through the bpf() system call (redirect/bpf_syscall.py).

The maps are pinned under `pin_dir` (bpffs), shared by every load and outliving the agent; the compiled
programs are pinned inside the maps' directory (they were loaded with those maps).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sidecarless.redirect.bpf_syscall import (
    BPF_CGROUP_SOCK_OPS,
    BPF_SK_MSG_VERDICT,
    PinnedMap,
    RingBuffer,
    attached_program_ids,
    object_get,
    program_attach,
    program_detach,
    program_id,
)
from sidecarless.redirect.maps import (
    ACTION_NAMES,
    DEFAULT_MAP_SIZES,
    EVENTS_MAP,
    FROM_POD,
    PROGRAM_FILE,
    SK_MSG,
    SOCK_OPS,
    SOCKETS_FILE,
    SOCKETS_MAP,
    TO_POD,
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
    endpoint_value_bytes,
    endpoint_value_of,
    interface_value_bytes,
    interface_value_of,
    ipcache_key_bytes,
    ipcache_prefix,
    policy_key_bytes,
    policy_key_of,
    policy_value_bytes,
    policy_value_of,
    port_from_network_order,
)

BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"
BPFFS = "/sys/fs/bpf"
HEADER_FILE = "sidecarless.h"
CT_FLAGS = {1: "from-node", 2: "seen-reply", 4: "closing", 8: "from-proxy"}  # SCL_CT_*
CT_TICK_SHIFT = 30  # SCL_CT_TICK_SHIFT: conntrack time is CLOCK_MONOTONIC in ticks of 2^30 ns
CT_TICK_S = (1 << CT_TICK_SHIFT) / 1e9
COUNTERS = {0: "dropped", 1: "redirected", 2: "events_lost", 3: "direct_flows", 4: "flows_redecided",
            5: "sockets_paired", 6: "sockets_unpaired"}  # fmt: skip
# bpf/sidecarless.h SCL_CONFIG_*
CONFIG_VERDICT_EVENTS = 0
CONFIG_DIRECT_ROUTING = 1
CONFIG_POLICY_REVISION = 2
CONFIG_CT_TIMEOUT_TCP = 3
CONFIG_CT_TIMEOUT_TCP_SYN = 4
CONFIG_CT_TIMEOUT_TCP_FIN = 5
CONFIG_CT_TIMEOUT_ANY = 6
CONFIG_NODE_NETNS = 7
CONFIG_SOCKETS = 8
SO_NETNS_COOKIE = 71  # Linux 5.14
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


def pinned_ipcache_identity(pin_dir: str, prefix: str, sizes: MapSizes = DEFAULT_MAP_SIZES) -> int | None:
    """The identity the kernel's ipcache under `pin_dir` gives `prefix` (its longest match), read from the pinned
    map itself, without the agent: a probe that costs the agents nothing (the churn benchmark's)."""
    try:
        ipcache = PinnedMap(f"{maps_dir(pin_dir, sizes)}/scl_ipcache")
    except OSError as error:
        raise OSError(error.errno, f"no pinned ipcache under {pin_dir}") from None
    try:
        value = ipcache.lookup(ipcache_key_bytes(prefix))
    finally:
        ipcache.close()
    return struct.unpack("<I", value)[0] if value is not None else None


def program_cflags(sizes: MapSizes) -> list[str]:
    return [
        f"-I{BPF_SOURCE_DIR}",
        f"-DSCL_ENDPOINTS_MAX={sizes.endpoints}",
        f"-DSCL_IPCACHE_MAX={sizes.ipcache}",
        f"-DSCL_POLICY_MAX={sizes.policy}",
        f"-DSCL_CONNTRACK_MAX={sizes.conntrack}",
    ]


def programs_dir(pinned_maps: str, cflags: list[str]) -> str:
    """Where the programs compiled from this source, with these flags, for this kernel are pinned: a restarted
    agent finds them there and does not compile again."""
    build = hashlib.sha256()
    for name in (PROGRAM_FILE, SOCKETS_FILE, HEADER_FILE):
        build.update((BPF_SOURCE_DIR / name).read_bytes())
    build.update(repr((cflags, os.uname().release)).encode())
    return f"{pinned_maps}/programs-{build.hexdigest()[:12]}"


COMPILE_TIMEOUT_S = 300.0


def compile_programs(pinned_maps: str, sizes: MapSizes) -> tuple[str, bool]:
    """The directory of pinned programs for this build, compiled by a child first if it is not there.
    Returns (directory, whether it was compiled now)."""
    cflags = program_cflags(sizes)
    target = programs_dir(pinned_maps, cflags)
    if os.path.isdir(target):
        return target, False
    command = [sys.executable, "-m", "sidecarless.redirect.compile_programs",
               str(BPF_SOURCE_DIR), pinned_maps, target, "--", *cflags]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    if done.returncode != 0 or not os.path.isdir(target):
        raise RuntimeError(f"compiling {PROGRAM_FILE} failed (exit {done.returncode}): {done.stderr.strip()[-4000:]}")
    return target, True


def _remove_other_layouts(pin_dir: str, keep: str) -> None:
    """Pins of an older layout: the programs that use those maps keep them until they are replaced."""
    for entry in Path(pin_dir).iterdir():
        if str(entry) == keep:
            continue
        if entry.is_dir() and entry.name.startswith("maps-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith("scl_"):
            entry.unlink(missing_ok=True)


def _remove_other_builds(pinned_maps: str, keep: str) -> None:
    """Programs of an older source: the interfaces they are attached to keep them until they are replaced."""
    for entry in Path(pinned_maps).iterdir():
        if entry.is_dir() and entry.name.startswith("programs-") and str(entry) != keep:
            shutil.rmtree(entry, ignore_errors=True)


def _decode_event(data: bytes) -> KernelEvent:
    raw = _KernelEventStruct.from_buffer_copy(data[: ctypes.sizeof(_KernelEventStruct)])
    return KernelEvent(
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


# struct scl_ct_key: saddr, daddr, sport, dport (network order), protocol; struct scl_ct_entry: action, flags,
# proxy_port, ifindex, reply_ifindex, revision, expires.
_CT_KEY = struct.Struct("<16s16s2s2sB3x")
_CT_ENTRY = struct.Struct("<BBHIIII4x")


class BpfDatapath:
    """The loaded programs and their maps."""

    def __init__(self, pin_dir: str, sizes: MapSizes = DEFAULT_MAP_SIZES) -> None:
        if not pin_dir.startswith(BPFFS + "/"):
            raise ValueError(f"pin directory {pin_dir} is not under {BPFFS}")
        self.pin_dir = pin_dir
        started = time.monotonic()
        self.maps_dir = maps_dir(pin_dir, sizes)
        os.makedirs(self.maps_dir, exist_ok=True)
        _remove_other_layouts(pin_dir, self.maps_dir)
        self.programs_dir, self.compiled = compile_programs(self.maps_dir, sizes)
        _remove_other_builds(self.maps_dir, self.programs_dir)
        self._from_pod = object_get(f"{self.programs_dir}/{FROM_POD}")
        self._to_pod = object_get(f"{self.programs_dir}/{TO_POD}")
        self._sock_ops = object_get(f"{self.programs_dir}/{SOCK_OPS}")
        self._sk_msg = object_get(f"{self.programs_dir}/{SK_MSG}")
        self._sockets = PinnedMap(f"{self.programs_dir}/{SOCKETS_MAP}")
        pinned = {name: PinnedMap(f"{self.maps_dir}/{name}") for name in PINNED_MAPS}
        self._endpoints = pinned["scl_endpoints"]
        self._interfaces = pinned["scl_interfaces"]
        self._ipcache = pinned["scl_ipcache"]
        self._policy = pinned["scl_policy"]
        self._conntrack = pinned["scl_conntrack"]
        self._counters = pinned["scl_counters"]
        self._hits = pinned["scl_hits"]
        self._config = pinned["scl_config"]
        self._events = RingBuffer(PinnedMap(f"{self.programs_dir}/{EVENTS_MAP}"))
        self._on_event: Callable[[KernelEvent], None] = lambda _event: None
        self._held: MapEntries | None = None  # what the maps hold, as last written or read
        self._held_exact = False  # False: a sync failed part way (or none ran yet); read the kernel
        self._conntrack_count: int | None = None  # tracked flows at the last collection
        self.load_s = round(time.monotonic() - started, 3)

    def build(self) -> dict[str, Any]:
        """Which compiled programs are in use, and whether this agent compiled them or found them pinned."""
        return {"programs": self.programs_dir, "compiled": self.compiled, "load_s": self.load_s}

    @property
    def from_pod(self) -> tuple[int, str]:
        """(fd, name) of the program for TC ingress of a pod's veth (and of the node's other interfaces)."""
        return self._from_pod, FROM_POD

    @property
    def to_pod(self) -> tuple[int, str]:
        """(fd, name) of the program for TC egress of a pod's veth."""
        return self._to_pod, TO_POD

    def sync(self, entries: MapEntries) -> bool:
        """Make the maps hold exactly `entries`; True if anything changed, and then the policy revision is
        bumped, so every tracked flow is decided again on its next packet. Adds and changes go first, deletes
        last, so a changed policy never passes through a state with less than either version allows or
        denies; a map that cannot hold both versions at once deletes first (never left too full for the next
        sync). Raises MapFull when the wanted entries alone do not fit."""
        current = self._current()
        self._held_exact = False  # a MapFull leaves the maps part way: read them again before the next sync
        changed = _sync_table(self._ipcache, current.ipcache, entries.ipcache, ipcache_key_bytes,
                              lambda identity: struct.pack("<I", identity))  # fmt: skip
        changed |= _sync_table(self._endpoints, current.endpoints, entries.endpoints, address_bytes,
                               endpoint_value_bytes)  # fmt: skip
        changed |= _sync_table(self._interfaces, current.interfaces, entries.interfaces,
                               lambda index: struct.pack("<I", index),
                               lambda value: interface_value_bytes(value, INTERFACE_POD))  # fmt: skip
        changed |= _sync_table(self._policy, current.policy, entries.policy, policy_key_bytes, policy_value_bytes)
        if changed:
            self._config.set_u64(CONFIG_POLICY_REVISION, self._config.get_u64(CONFIG_POLICY_REVISION) + 1)
        self._held, self._held_exact = entries, True
        return changed

    def _current(self) -> MapEntries:
        """What the maps hold: as this agent last wrote them, or read from the kernel (after a start, or a sync
        that failed part way). Only the agent writes them (one sync at a time, from its reconcile thread)."""
        if self._held is None or not self._held_exact:
            self._held, self._held_exact = self._read_maps(), True
        return self._held

    def _read_maps(self) -> MapEntries:
        return MapEntries(
            self.endpoint_entries(), self.ipcache_entries(), self.policy_entries(), self.interface_entries()
        )

    def interface_entries(self) -> dict[int, InterfaceValue]:
        return {struct.unpack("<I", key)[0]: interface_value_of(value) for key, value in self._interfaces.items()}

    def set_conntrack_timeouts(self, timeouts: ConntrackTimeouts) -> None:
        for index, seconds in (
            (CONFIG_CT_TIMEOUT_TCP, timeouts.tcp),
            (CONFIG_CT_TIMEOUT_TCP_SYN, timeouts.tcp_syn),
            (CONFIG_CT_TIMEOUT_TCP_FIN, timeouts.tcp_fin),
            (CONFIG_CT_TIMEOUT_ANY, timeouts.any),
        ):
            self._config.set_u64(index, max(1, math.ceil(seconds / CT_TICK_S)))

    def collect_conntrack(self) -> int:
        """Remove expired flows (the program ignores them already; this keeps the table from filling with
        them). Returns how many were removed."""
        now = _now_ticks()
        entries = list(self._conntrack.items())
        expired = [key for key, entry in entries if _CT_ENTRY.unpack(entry)[6] < now]
        self._conntrack_count = len(entries) - len(expired)
        return sum(1 for key in expired if self._conntrack.delete(key))

    def conntrack_entries(self) -> Iterator[dict[str, Any]]:
        """The tracked flows, as `bpf ct list` shows them."""
        now = _now_ticks()
        for key, value in self._conntrack.items():
            saddr, daddr, sport, dport, protocol = _CT_KEY.unpack(key)
            action, flags, _proxy_port, _ifindex, _reply_ifindex, revision, expires = _CT_ENTRY.unpack(value)
            yield {
                "source": _endpoint_text(saddr, int.from_bytes(sport, "big")),
                "destination": _endpoint_text(daddr, int.from_bytes(dport, "big")),
                "protocol": protocol,
                "action": ACTION_NAMES.get(action, str(action)),
                "flags": ",".join(name for bit, name in CT_FLAGS.items() if flags & bit) or "-",
                "revision": revision,
                "expires_in_s": round((expires - now) * CT_TICK_S, 1),
            }

    def policy_entries(self) -> dict[PolicyKey, PolicyValue]:
        return {policy_key_of(key): policy_value_of(value) for key, value in self._policy.items()}

    def endpoint_entries(self) -> dict[str, EndpointValue]:
        return {address_text(key): endpoint_value_of(value) for key, value in self._endpoints.items()}

    def ipcache_entries(self) -> dict[str, int]:
        return {ipcache_prefix(key): struct.unpack("<I", value)[0] for key, value in self._ipcache.items()}

    def map_fill(self) -> dict[str, dict[str, int]]:
        """Entries and capacity of each map, without walking them (status and metrics ask often): what the
        agent wrote, and the tracked flows as the last collection counted them."""
        # During a sync, the counts before it; never stored from here: a read racing a sync would leave the
        # next sync a stale view.
        held = self._held or self._read_maps()
        if self._conntrack_count is None:
            self._conntrack_count = len(self._conntrack)
        counts = {
            "scl_endpoints": (len(held.endpoints), self._endpoints),
            "scl_interfaces": (len(held.interfaces), self._interfaces),
            "scl_ipcache": (len(held.ipcache), self._ipcache),
            "scl_policy": (len(held.policy), self._policy),
            "scl_conntrack": (self._conntrack_count, self._conntrack),
        }
        return {name: {"entries": count, "max_entries": table.max_entries} for name, (count, table) in counts.items()}

    def set_direct_routing(self, enabled: bool) -> None:
        """Flows between two pods of this node go veth to veth (the fast path), or through the node's stack."""
        self._config.set_u64(CONFIG_DIRECT_ROUTING, 1 if enabled else 0)

    def accelerate_sockets(self, cgroup: str | None) -> None:
        """Socket acceleration (bpf/sockets.bpf.c) for the sockets of the processes in `cgroup` (a cgroup v2
        directory holding the pods and the proxy), or off (None): no new connection is accelerated, and an
        accelerated one goes back to the stack with its next message."""
        if cgroup is None:
            self._config.set_u64(CONFIG_SOCKETS, 0)
            return
        self._config.set_u64(CONFIG_NODE_NETNS, _netns_cookie())
        program_attach(self._sockets.fd, self._sk_msg, BPF_SK_MSG_VERDICT)
        directory = _open_cgroup(cgroup)
        try:
            program_attach(directory, self._sock_ops, BPF_CGROUP_SOCK_OPS)
        finally:
            os.close(directory)
        self._config.set_u64(CONFIG_SOCKETS, 1)

    def set_verdict_events(self, enabled: bool) -> None:
        """Report allowed new flows (policy verdicts) in the ring buffer; drops are always reported."""
        self._config.set_u64(CONFIG_VERDICT_EVENTS, 1 if enabled else 0)

    def hit_counts(self, indexes: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Flows (allowed, denied) counted on each rule-item counter index (bpf/sidecarless.h scl_hits)."""
        return {index: (self._hits.get_u64(2 * index), self._hits.get_u64(2 * index + 1)) for index in indexes}

    def reset_hits(self, indexes: Iterable[int]) -> None:
        """Zero counters before they are given to other rule items."""
        for index in indexes:
            for slot in (2 * index, 2 * index + 1):
                self._hits.set_u64(slot, 0)

    def counters(self) -> dict[str, int]:
        return {name: self._counters.get_u64(index) for index, name in COUNTERS.items()}

    def open_events(self, callback: Callable[[KernelEvent], None]) -> None:
        self._on_event = callback

    def poll_events(self, timeout_ms: int) -> None:
        self._events.poll(timeout_ms, lambda data: self._on_event(_decode_event(data)))


PINNED_MAPS = ("scl_endpoints", "scl_interfaces", "scl_ipcache", "scl_policy", "scl_conntrack", "scl_counters",
               "scl_hits", "scl_config")  # fmt: skip


def _endpoint_text(address: bytes, port: int) -> str:
    text = address_text(address)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _sync_table(
    table: PinnedMap,
    current: Mapping[Any, Any],
    wanted: Mapping[Any, Any],
    key_of: Callable[[Any], bytes],
    value_of: Callable[[Any], bytes],
) -> bool:
    """One map to exactly `wanted`: writes first, deletes last, unless both sets together would not fit."""
    writes = [key for key, value in wanted.items() if current.get(key) != value]
    deletes = [key for key in current if key not in wanted]
    added = sum(1 for key in writes if key not in current)
    if len(current) + added > table.max_entries:
        _delete(table, deletes, key_of)
        deletes = []
    for key in writes:
        try:
            table.update(key_of(key), value_of(wanted[key]))
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.E2BIG):
                raise MapFull(f"{table.name}: no room for {len(wanted)} entries ({table.max_entries} max)") from error
            raise
    _delete(table, deletes, key_of)
    return bool(writes or deletes)


def _delete(table: PinnedMap, keys: list[Any], key_of: Callable[[Any], bytes]) -> None:
    for key in keys:
        table.delete(key_of(key))


def set_socket_acceleration(pin_dir: str, enabled: bool, sizes: MapSizes = DEFAULT_MAP_SIZES) -> None:
    """Accelerate new connections or none, in the pinned maps of an agent that attached socket acceleration
    (the benchmark switches it between runs)."""
    config = PinnedMap(f"{maps_dir(pin_dir, sizes)}/scl_config")
    try:
        config.set_u64(CONFIG_SOCKETS, 1 if enabled else 0)
    finally:
        config.close()


def detach_socket_programs(pin_dir: str, cgroup: str) -> list[str]:
    """Takes sidecarless's sock_ops program (any build pinned under `pin_dir`) off `cgroup` (datapath uninstall):
    until then the cgroup holds it, and through it the maps. Another owner's program there stays."""
    directory = _open_cgroup(cgroup)
    done = []
    try:
        attached = set(attached_program_ids(directory, BPF_CGROUP_SOCK_OPS))
        for pinned in sorted(Path(pin_dir).glob(f"*/*/{SOCK_OPS}")):
            program = object_get(str(pinned))
            try:
                if (pinned_id := program_id(program)) in attached:
                    program_detach(directory, program, BPF_CGROUP_SOCK_OPS)
                    attached.discard(pinned_id)
                    done.append(f"detached socket acceleration from {cgroup}")
            finally:
                os.close(program)
    finally:
        os.close(directory)
    done += [f"left sock_ops program {id_} on {cgroup}: not sidecarless's" for id_ in sorted(attached)]
    return done


def _open_cgroup(cgroup: str) -> int:
    try:
        return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:  # FileNotFoundError and the like, with the path and what it is for
        raise OSError(error.errno, f"socket acceleration: cgroup {cgroup}: {error.strerror}") from None


def _netns_cookie() -> int:
    """The cookie of this process's network namespace, as bpf_get_netns_cookie() gives it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)


def _now_ticks() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> CT_TICK_SHIFT
