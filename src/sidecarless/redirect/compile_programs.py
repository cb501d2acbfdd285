"""Compiles bpf/from_pod.bpf.c with BCC and pins its programs and event ring: the only module that imports bcc.

It runs in a short-lived child (`python -m sidecarless.redirect.compile_programs SOURCE DIR -- CFLAGS...`), started by
redirect/bpf.py when no compiled programs for this source, these flags and this kernel are pinned yet: the
agent never holds BCC and LLVM (about 100 MiB), and a restarted agent opens what is pinned in milliseconds.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

from bcc import BPF

from sidecarless.redirect.bpf_syscall import object_pin
from sidecarless.redirect.maps import EVENTS_MAP, PROGRAM_NAMES


def compile_and_pin(source: Path, cflags: list[str], programs_dir: str) -> None:
    """Pins each program and the ring buffer under `programs_dir`, which appears whole or not at all (written
    beside it, then renamed: an agent killed meanwhile leaves no half a directory to trust)."""
    bpf = BPF(src_file=str(source).encode(), cflags=cflags)
    staging = f"{programs_dir}-staging-{os.getpid()}"  # bpffs refuses names with a dot
    os.makedirs(staging)
    try:
        for name in PROGRAM_NAMES:
            program = bpf.load_func(name.encode(), BPF.SCHED_CLS)
            object_pin(int(program.fd), f"{staging}/{name}")
        object_pin(int(bpf[EVENTS_MAP.encode()].map_fd), f"{staging}/{EVENTS_MAP}")
        os.rename(staging, programs_dir)
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise  # else another agent compiled the same programs meanwhile: theirs are as good
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecarless.redirect.compile_programs")
    parser.add_argument("source", type=Path)
    parser.add_argument("programs_dir")
    parser.add_argument("cflags", nargs="*")
    args = parser.parse_args(argv)
    compile_and_pin(args.source, args.cflags, args.programs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
