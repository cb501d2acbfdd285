"""The lab's kubelet: runs the agent and restarts it when it exits, as kubelet restarts a DaemonSet pod.

It writes what it does to `agent.json` in the lab directory ({pid, starts, last_exit}), the one file it
owns, so `lab status` shows the current agent and tests can wait for a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType

RESTART_BACKOFF_INITIAL_S = 0.2
RESTART_BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 10.0


def supervise(command: list[str], log_path: Path, record_path: Path) -> int:
    """Run `command` until SIGTERM, restarting it whenever it exits. Returns 0 after SIGTERM."""
    stopping = threading.Event()
    current: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        if current and current[0].poll() is None:
            current[0].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    starts, last_exit, backoff = 0, None, RESTART_BACKOFF_INITIAL_S
    while not stopping.is_set():
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        current[:] = [process]
        starts += 1
        started = time.monotonic()
        _record(record_path, {"pid": process.pid, "starts": starts, "last_exit": last_exit})
        last_exit = process.wait()
        _record(record_path, {"pid": None, "starts": starts, "last_exit": last_exit})
        if time.monotonic() - started > STABLE_AFTER_S:
            backoff = RESTART_BACKOFF_INITIAL_S
        if stopping.wait(backoff):
            break
        backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
    return 0


def _record(path: Path, record: dict[str, object]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)


def read_record(path: Path) -> dict[str, object]:
    try:
        record: dict[str, object] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"pid": None, "starts": 0, "last_exit": None}
    return record
