"""Compiles bpf/from_pod.bpf.c and bpf/sockets.bpf.c with BCC, loads their programs against the pinned maps and
pins them: the only module that imports bcc.

It runs in a short-lived child (`python -m sidecarless.redirect.compile_programs SOURCE_DIR MAPS_DIR PROGRAMS_DIR
-- CFLAGS...`), started by redirect/bpf.py when no compiled programs for this source, these flags and this kernel
are pinned yet: the agent never holds BCC and LLVM (about 100 MiB), and a restarted agent opens what is pinned in
milliseconds.

BCC only compiles here. It would open pinned maps by id, which takes CAP_SYS_ADMIN (the agent's container has
NET_ADMIN and BPF): so BCC compiles against maps of its own, and the child loads each program's instructions
with those map fds replaced by the pinned maps' (opened by path, which BPF allows), or pins BCC's maps where
none are pinned yet (a node's first start).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

from bcc import BPF
from bcc.libbcc import lib

from sidecarless.redirect.bpf_syscall import map_info, object_get, object_pin, program_load, with_map_fds
from sidecarless.redirect.maps import (
    EVENTS_MAP,
    FROM_POD,
    PROGRAM_FILE,
    SHARED_MAPS,
    SK_MSG,
    SOCK_OPS,
    SOCKET_STORAGE_MAP,
    SOCKETS_FILE,
    SOCKETS_MAP,
    TO_POD,
)

# Per source: its programs (name -> program type) and the maps of its own that are pinned beside them.
BUILDS = (
    (PROGRAM_FILE, {FROM_POD: BPF.SCHED_CLS, TO_POD: BPF.SCHED_CLS}, (EVENTS_MAP,)),
    (SOCKETS_FILE, {SOCK_OPS: BPF.SOCK_OPS, SK_MSG: BPF.SK_MSG}, (SOCKETS_MAP,)),
)
OWN_MAPS = (EVENTS_MAP, SOCKETS_MAP, SOCKET_STORAGE_MAP)


def shared_map_fd(compiled_fd: int, pin: str) -> int:
    """The pinned map at `pin`, which must be what the program was compiled for; none yet: BCC's, pinned there."""
    try:
        fd = object_get(pin)
    except FileNotFoundError:
        try:
            object_pin(compiled_fd, pin)
            return compiled_fd
        except FileExistsError:
            fd = object_get(pin)  # another agent pinned it meanwhile
    if map_info(fd) != map_info(compiled_fd):
        raise RuntimeError(f"{pin}: pinned as {map_info(fd)}, the programs need {map_info(compiled_fd)}")
    return fd


def compile_and_pin(source_dir: Path, cflags: list[str], maps_dir: str, programs_dir: str) -> None:
    """Pins each program and each source's own maps under `programs_dir`, which appears whole or not at all
    (written beside it, then renamed: an agent killed meanwhile leaves no half a directory to trust)."""
    staging = f"{programs_dir}-staging-{os.getpid()}"  # bpffs refuses names with a dot
    os.makedirs(staging)
    try:
        for source, programs, pinned_here in BUILDS:
            module = BPF(src_file=str(source_dir / source).encode(), cflags=cflags)
            # By fd through libbcc: BCC's Python tables do not know a socket hash or socket storage.
            fds = {name: lib.bpf_table_fd(module.module, name.encode()) for name in (*SHARED_MAPS, *OWN_MAPS)}
            compiled = {name: fd for name, fd in fds.items() if fd >= 0}
            shared = {name: fd for name, fd in compiled.items() if name in SHARED_MAPS}
            loaded = {fd: shared_map_fd(fd, f"{maps_dir}/{name}") for name, fd in shared.items()}
            for name, program_type in programs.items():
                fd = program_load(program_type, name, with_map_fds(module.dump_func(name.encode()), loaded))
                object_pin(fd, f"{staging}/{name}")
            for name in pinned_here:
                object_pin(compiled[name], f"{staging}/{name}")
        os.rename(staging, programs_dir)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise  # else another agent compiled the same programs meanwhile: theirs are as good
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecarless.redirect.compile_programs")
    parser.add_argument("source_dir", type=Path)
    parser.add_argument("maps_dir")
    parser.add_argument("programs_dir")
    parser.add_argument("cflags", nargs="*")
    args = parser.parse_args(argv)
    compile_and_pin(args.source_dir, args.cflags, args.maps_dir, args.programs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
