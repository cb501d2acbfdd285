"""The bpf() system call through libc: pinned maps and programs, and a ring buffer reader, without BCC.

The agent never loads BCC (and LLVM with it: about 100 MiB); a short-lived child compiles and pins the programs
(redirect/compile_programs.py), and the agent opens what is pinned. Layouts as in include/uapi/linux/bpf.h.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import select
import struct
from collections.abc import Callable, Iterator

SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD = 5
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_MAP_TYPE_RINGBUF = 27
BPF_ANY = 0
BPF_CGROUP_SOCK_OPS = 3  # enum bpf_attach_type
BPF_SK_MSG_VERDICT = 7

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # or next_key
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    ]


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
    ]


class _LoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


def _bpf(command: int, attr: ctypes.Structure) -> int:
    result = _libc.syscall(SYS_BPF[platform.machine()], command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(result)


def object_get(path: str) -> int:
    """An fd for the map or program pinned at `path`."""
    name = ctypes.create_string_buffer(path.encode())
    try:
        return _bpf(BPF_OBJ_GET, _ObjAttr(ctypes.addressof(name), 0, 0))
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror}: {path}") from None


def object_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(ctypes.addressof(name), fd, 0))


def program_attach(target_fd: int, program_fd: int, attach_type: int) -> None:
    """Attaches a program to a cgroup or a map; with no flags, it replaces the one attached there before (so an
    agent that starts again attaches its program once, not a second time beside the first)."""
    _bpf(BPF_PROG_ATTACH, _AttachAttr(target_fd, program_fd, attach_type, 0, 0))


def program_detach(target_fd: int, program_fd: int, attach_type: int) -> None:
    _bpf(BPF_PROG_DETACH, _AttachAttr(target_fd, program_fd, attach_type, 0, 0))


def attached_program_ids(target_fd: int, attach_type: int) -> list[int]:
    """The ids of the programs attached to a cgroup (or a map) for `attach_type`."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_fd, attach_type, 0, 0, ctypes.addressof(ids), 64)
    _bpf(BPF_PROG_QUERY, attr)
    return list(ids[: min(int(attr.prog_cnt), 64)])


PSEUDO_MAP_FD = 1  # a 64-bit immediate load (opcode 0x18) whose source register says: the immediate is a map fd
LOAD_IMM64 = 0x18
VERIFIER_LOG_SIZE = 1 << 22


def program_load(program_type: int, name: str, instructions: bytes, license_name: str = "GPL") -> int:
    """Loads a program (BPF_PROG_LOAD) and returns its fd; a program the verifier refuses raises with the
    verifier's log, taken on a second try (a log costs the first one nothing)."""
    code = ctypes.create_string_buffer(instructions, len(instructions))
    license_text = ctypes.create_string_buffer(license_name.encode())
    attr = _LoadAttr(program_type, len(instructions) // 8, ctypes.addressof(code), ctypes.addressof(license_text))
    attr.prog_name = name.encode()[:15]
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as error:
        log = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
        attr.log_level, attr.log_size, attr.log_buf = 1, VERIFIER_LOG_SIZE, ctypes.addressof(log)
        try:
            return _bpf(BPF_PROG_LOAD, attr)
        except OSError:
            message = log.value.decode(errors="replace")[-4000:]
            raise OSError(error.errno, f"loading {name}: {error.strerror}\n{message}") from None


def with_map_fds(instructions: bytes, fds: dict[int, int]) -> bytes:
    """`instructions` with each map fd they load replaced as `fds` says (compiled against one set of maps,
    loaded against another); a map fd `fds` does not name stays."""
    code = bytearray(instructions)
    for offset in range(0, len(code) - 15, 8):
        opcode, registers, _offset, immediate = struct.unpack_from("<BBhi", code, offset)
        if opcode == LOAD_IMM64 and registers >> 4 == PSEUDO_MAP_FD and immediate in fds:
            struct.pack_into("<i", code, offset + 4, fds[immediate])
    return bytes(code)


def _object_info(fd: int, info: ctypes.Structure) -> None:
    """Fills `info` (a map's or a program's info layout) for the object behind `fd`."""
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info)))


def _map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    _object_info(fd, info)
    return info


def map_info(fd: int) -> tuple[int, int, int, int, int]:
    """(type, key size, value size, max entries, flags) of a map."""
    info = _map_info(fd)
    return int(info.type), int(info.key_size), int(info.value_size), int(info.max_entries), int(info.map_flags)


class _ProgramInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_ubyte * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
    ]


def program_map_ids(fd: int) -> list[int]:
    """The ids of the maps a loaded program uses."""
    ids = (ctypes.c_uint32 * 64)()
    info = _ProgramInfo(nr_map_ids=64, map_ids=ctypes.addressof(ids))
    _object_info(fd, info)
    return list(ids[: min(int(info.nr_map_ids), 64)])


def program_id(fd: int) -> int:
    info = _ProgramInfo()
    _object_info(fd, info)
    return int(info.id)


def map_id(fd: int) -> int:
    return int(_map_info(fd).id)


class PinnedMap:
    """A kernel map opened from its pin; keys and values are the bytes of bpf/sidecarless.h's structures."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.fd = object_get(path)
        info = _map_info(self.fd)
        self.type, self.key_size, self.value_size = int(info.type), int(info.key_size), int(info.value_size)
        self.max_entries = int(info.max_entries)
        self._key = ctypes.create_string_buffer(max(self.key_size, 1))
        self._next_key = ctypes.create_string_buffer(max(self.key_size, 1))
        self._value = ctypes.create_string_buffer(max(self.value_size, 1))

    def close(self) -> None:
        os.close(self.fd)

    def _elem(self, command: int, key: bytes, value: int, flags: int = 0) -> int:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: keys are {self.key_size} bytes, given {len(key)}")
        ctypes.memmove(self._key, key, self.key_size)
        return _bpf(command, _ElemAttr(self.fd, 0, ctypes.addressof(self._key), value, flags))

    def lookup(self, key: bytes) -> bytes | None:
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, key, ctypes.addressof(self._value))
        except OSError as error:
            if error.errno == errno.ENOENT:
                return None
            raise
        return self._value.raw[: self.value_size]

    def update(self, key: bytes, value: bytes) -> None:
        """Raises OSError(ENOSPC) (E2BIG for an array index out of range) when the map has no room."""
        if len(value) != self.value_size:
            raise ValueError(f"{self.name}: values are {self.value_size} bytes, given {len(value)}")
        buffer = ctypes.create_string_buffer(value, self.value_size)
        self._elem(BPF_MAP_UPDATE_ELEM, key, ctypes.addressof(buffer), BPF_ANY)

    def delete(self, key: bytes) -> bool:
        """False if it was not there (gone meanwhile: the program or the LRU removed it)."""
        try:
            self._elem(BPF_MAP_DELETE_ELEM, key, 0)
        except OSError as error:
            if error.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key, as the kernel walks them (an entry deleted meanwhile restarts the walk, as in bpftool)."""
        attr = _ElemAttr(self.fd, 0, 0, ctypes.addressof(self._next_key), 0)  # key 0: the first
        while True:
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as error:
                if error.errno == errno.ENOENT:
                    return
                raise
            key = self._next_key.raw[: self.key_size]
            yield key
            ctypes.memmove(self._key, key, self.key_size)
            attr.key = ctypes.addressof(self._key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def get_u64(self, index: int) -> int:
        """An array map of u64 values: the value at `index`."""
        value = self.lookup(struct.pack("<I", index))
        return struct.unpack("<Q", value)[0] if value is not None else 0

    def set_u64(self, index: int, value: int) -> None:
        self.update(struct.pack("<I", index), struct.pack("<Q", value))


RINGBUF_BUSY = 1 << 31
RINGBUF_DISCARD = 1 << 30
RINGBUF_HEADER = 8


class RingBuffer:
    """A BPF_MAP_TYPE_RINGBUF read as libbpf reads it: the consumer position page mapped writable, the producer
    position page and the data (mapped twice in a row, so a record never wraps) read-only."""

    def __init__(self, ring: PinnedMap) -> None:
        if ring.type != BPF_MAP_TYPE_RINGBUF:
            raise ValueError(f"{ring.name} is not a ring buffer (map type {ring.type})")
        self._map = ring
        self._size = ring.max_entries
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(ring.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(ring.fd, page + 2 * self._size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data_start = page
        self._poll = select.poll()
        self._poll.register(ring.fd, select.POLLIN)

    def poll(self, timeout_ms: int, callback: Callable[[bytes], None]) -> int:
        """Wait up to `timeout_ms` for records, then hand each to `callback`. Returns how many."""
        if not self._pending():
            self._poll.poll(timeout_ms)
        return self.consume(callback)

    def _pending(self) -> bool:
        return bool(struct.unpack_from("<Q", self._producer, 0)[0] != struct.unpack_from("<Q", self._consumer, 0)[0])

    def consume(self, callback: Callable[[bytes], None]) -> int:
        consumer = struct.unpack_from("<Q", self._consumer, 0)[0]
        count = 0
        while True:
            producer = struct.unpack_from("<Q", self._producer, 0)[0]
            if consumer >= producer:
                return count
            offset = self._data_start + (consumer & (self._size - 1))
            (length,) = struct.unpack_from("<I", self._producer, offset)
            if length & RINGBUF_BUSY:
                return count  # reserved, not yet committed: read it next time
            size = length & ~(RINGBUF_BUSY | RINGBUF_DISCARD)
            if not length & RINGBUF_DISCARD:
                start = offset + RINGBUF_HEADER
                callback(bytes(self._producer[start : start + size]))
                count += 1
            consumer += (size + RINGBUF_HEADER + 7) & ~7
            struct.pack_into("<Q", self._consumer, 0, consumer)

    def close(self) -> None:
        self._poll.unregister(self._map.fd)
        self._consumer.close()
        self._producer.close()
