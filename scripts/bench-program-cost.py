"""The TC program's cost per packet, this checkout's against another revision's, in one interleaved run.

Each program is loaded by BCC with its own pinned maps and run on hand-made frames by the kernel itself
(BPF_PROG_TEST_RUN: no network, no scheduler), so the figure is the program's alone: a packet of an established
flow, and a SYN that opens one (policy looked up, conntrack written). Rounds alternate the programs; the
figures are medians. Run as root:

    .venv/bin/python scripts/bench-program-cost.py [--base 3d3a881] [--rounds 9] [--repeat 200000]

Writes bench/results/program-cost-<time>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bcc import BPF

from sidecarless.redirect.maps import (
    InterfaceValue,
    PolicyKey,
    address_bytes,
    interface_value_bytes,
    policy_key_bytes,
    port_to_network_order,
)

REPO = Path(__file__).resolve().parents[1]
SYS_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
CLIENT, SERVER, SPORT, DPORT = "10.0.0.1", "10.0.0.2", 40000, 5432
CLIENT6, SERVER6 = "fd00::1", "fd00::2"
SERVER_ENDPOINT_ID = 7
CLIENT_IDENTITY, SERVER_IDENTITY = 300, 301
LOOPBACK_IFINDEX = 1  # the test run's packets come in on the namespace's loopback


class TestRun(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32), ("pad", ctypes.c_uint32),
    ]  # fmt: skip


def frame(flags: int, family: int = 4) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", SPORT, DPORT, 1, 1, 5 << 4, flags, 64240, 0, 0)
    if family == 6:
        addresses = address_bytes(CLIENT6) + address_bytes(SERVER6)
        ip = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + addresses
        return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x86DD) + ip + tcp
    addresses = bytes(int(x) for x in CLIENT.split(".")) + bytes(int(x) for x in SERVER.split("."))
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0) + addresses
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800) + ip + tcp


def test_run(fd: int, data: bytes, repeat: int) -> tuple[int, int]:
    """(verdict, ns per run)"""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    attr = TestRun(prog_fd=fd, data_size_in=len(data), data_in=ctypes.addressof(buffer), repeat=repeat,
                   data_size_out=len(out), data_out=ctypes.addressof(out))  # fmt: skip
    if libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN failed")
    return attr.retval, attr.duration


def leaf(table: Any, **values: int) -> Any:
    value = table.Leaf()
    for name, number in values.items():
        setattr(value, name, number)
    return value


def load(source_dir: Path, pin_dir: str) -> tuple[BPF, int, bool]:
    """The program and whether it speaks IPv6 (the 16-byte key layout of issue 14)."""
    shutil.rmtree(pin_dir, ignore_errors=True)
    Path(pin_dir).mkdir(parents=True)
    bpf = BPF(src_file=str(source_dir / "from_pod.bpf.c").encode(),
              cflags=[f"-I{source_dir}", f'-DSCL_PIN_DIR="{pin_dir}"'])  # fmt: skip
    program = bpf.load_func(b"from_pod", BPF.SCHED_CLS)
    endpoints, policy, conntrack = bpf[b"scl_endpoints"], bpf[b"scl_policy"], bpf[b"scl_conntrack"]
    if ctypes.sizeof(endpoints.Key) == 16:
        _fill_dual_stack(bpf)
        return bpf, int(program.fd), True
    # The IPv4-only layout before issue 14: addresses as u32 in network order.
    client, server = (int.from_bytes(address_bytes(ip)[12:], "little") for ip in (CLIENT, SERVER))
    endpoints[endpoints.Key(client)] = leaf(endpoints, identity=CLIENT_IDENTITY)
    endpoints[endpoints.Key(server)] = leaf(endpoints, identity=SERVER_IDENTITY, flags=1)  # ingress enforced
    policy_key = policy.Key(96, server, CLIENT_IDENTITY, 0, 6, port_to_network_order(DPORT))
    policy[policy_key] = leaf(policy, action=1)
    if _has_table(bpf, b"scl_interfaces"):  # the source check's map (issue 12)
        interfaces = bpf[b"scl_interfaces"]
        interfaces[ctypes.c_uint32(LOOPBACK_IFINDEX)] = leaf(interfaces, flags=1, ip4=client)
    flow = conntrack.Key(client, server, port_to_network_order(SPORT), port_to_network_order(DPORT), 6)
    entry = conntrack.Leaf()
    entry.action = 1
    if hasattr(entry, "expires_s"):
        entry.expires_s = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000_000 + 100_000
    conntrack[flow] = entry
    return bpf, int(program.fd), False


def _fill_dual_stack(bpf: BPF) -> None:
    """The same pods, policy and established flow, in both families, in the 16-byte layout."""
    endpoints, policy, conntrack = bpf[b"scl_endpoints"], bpf[b"scl_policy"], bpf[b"scl_conntrack"]
    for ip in (CLIENT, CLIENT6):
        endpoints[endpoints.Key.from_buffer_copy(address_bytes(ip))] = leaf(endpoints, identity=CLIENT_IDENTITY, id=1)
    for ip in (SERVER, SERVER6):
        endpoints[endpoints.Key.from_buffer_copy(address_bytes(ip))] = leaf(
            endpoints, identity=SERVER_IDENTITY, flags=1, id=SERVER_ENDPOINT_ID
        )
    key = PolicyKey(SERVER_ENDPOINT_ID, CLIENT_IDENTITY, 0, 6, DPORT, 16)
    policy[policy.Key.from_buffer_copy(policy_key_bytes(key))] = leaf(policy, action=1)
    interfaces = bpf[b"scl_interfaces"]
    interfaces[ctypes.c_uint32(LOOPBACK_IFINDEX)] = interfaces.Leaf.from_buffer_copy(
        interface_value_bytes(InterfaceValue(CLIENT, CLIENT6), 1)
    )
    expires = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> 30) + 100_000
    for client, server in ((CLIENT, SERVER), (CLIENT6, SERVER6)):
        ports = struct.pack("!HHB3x", SPORT, DPORT, 6)
        flow = conntrack.Key.from_buffer_copy(address_bytes(client) + address_bytes(server) + ports)
        conntrack[flow] = leaf(conntrack, action=1, expires=expires)


def _has_table(bpf: BPF, name: bytes) -> bool:
    try:
        bpf[name]
    except KeyError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="3d3a881", help="the revision to compare with (default: before issue 12)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scl-progcost-") as directory:
        base_dir = Path(directory)
        for name in ("from_pod.bpf.c", "sidecarless.h"):
            text = subprocess.run(["git", "-C", str(REPO), "show", f"{args.base}:bpf/{name}"], check=True,
                                  capture_output=True, text=True).stdout  # fmt: skip
            (base_dir / name).write_text(text)
        programs = {
            args.base: load(base_dir, "/sys/fs/bpf/scl-progcost-base"),
            "this checkout": load(REPO / "bpf", "/sys/fs/bpf/scl-progcost-new"),
        }
        cases = {"established flow, ACK": frame(0x10), "new flow, SYN": frame(0x02),
                 "IPv6 established flow, ACK": frame(0x10, 6), "IPv6 new flow, SYN": frame(0x02, 6)}  # fmt: skip
        samples: dict[str, dict[str, list[int]]] = {case: {} for case in cases}
        try:
            for _ in range(args.rounds):
                for case, data in cases.items():
                    for name, (_, fd, dual_stack) in programs.items():
                        if case.startswith("IPv6") and not dual_stack:
                            continue  # a program before issue 14 drops IPv6
                        verdict, nanoseconds = test_run(fd, data, args.repeat)
                        if verdict != 0:
                            raise SystemExit(f"{name}, {case}: verdict {verdict}, not TC_ACT_OK: the set-up is wrong")
                        samples[case].setdefault(name, []).append(nanoseconds)
        finally:
            for pin in ("/sys/fs/bpf/scl-progcost-base", "/sys/fs/bpf/scl-progcost-new"):
                shutil.rmtree(pin, ignore_errors=True)
    medians = {case: {name: statistics.median(values) for name, values in by.items()} for case, by in samples.items()}
    print(f"{'case':28} {args.base:>14} {'this checkout':>14}  ratio")
    for case, by in medians.items():
        new = by["this checkout"]
        if args.base in by:
            base = by[args.base]
            print(f"{case:28} {base:>11.1f} ns {new:>11.1f} ns  {new / base:.2f}x")
        else:
            print(f"{case:28} {'-':>14} {new:>11.1f} ns")
    results = REPO / "bench" / "results" / f"program-cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    summary = {"kind": "program-cost", "base": args.base, "rounds": args.rounds, "repeat": args.repeat,
               "median_ns": medians, "samples_ns": samples}  # fmt: skip
    results.write_text(json.dumps(summary, indent=2))
    print(f"results: {results.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
