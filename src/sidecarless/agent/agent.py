"""The node agent: wires policy sources, the compiler, the xDS server, Envoy and the datapath.

One change, step by step: a source yields an update (sources/) -> `_publish` compiles it (policy/compile.py)
and renders it (xds/render.py, xds/snapshot.py) -> the xDS server sends it (xds/server.py) and Envoy ACKs
(xds/acks.py) -> `_reconcile_datapath` asks the ACK gate (agent/enforce.py) what may be redirected and writes
the maps (redirect/maps.py, redirect/bpf.py). Readiness is a list of named pending tasks; the agent is ready
when that list is empty: every endpoint's interface has the program, Envoy has ACKed the current
configuration, and every L7 port is redirected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from sidecarless import __version__
from sidecarless.agent import heap
from sidecarless.agent.config import HOST_ROUTING_BPF, AgentConfig, AgentState, envoy_process, open_source
from sidecarless.agent.enforce import Target, enforcement, target_of
from sidecarless.agent.hits import RuleHits
from sidecarless.agent.monitoring import Monitoring, xds_counters
from sidecarless.agent.node import NODE, attach_programs, node_has_ipv6, prepare_node
from sidecarless.agent.views import AgentViews
from sidecarless.api.server import start_api
from sidecarless.envoy.process import Handover
from sidecarless.observe.logs import LogKey
from sidecarless.observe.metrics import AgentMetrics
from sidecarless.policy.audit import with_audit
from sidecarless.policy.compile import Compiler
from sidecarless.policy.identity import TooManyIdentities
from sidecarless.policy.model import EGRESS, INGRESS, enforced_policies
from sidecarless.policy.plan import Plan
from sidecarless.redirect.bpf import BpfDatapath, MapFull
from sidecarless.redirect.maps import MARK_FROM_PROXY, capacity_problems, render_maps
from sidecarless.sources.source import NodeState, PolicySet, Source
from sidecarless.xds.accesslog import AccessLogService
from sidecarless.xds.acks import AckState
from sidecarless.xds.render import Renderer
from sidecarless.xds.server import AdsServer, start_server
from sidecarless.xds.snapshot import Snapshot

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger(__name__)

# How long a restarted agent leaves the maps as they are while the Envoy it adopted reconnects.
ADOPTION_GRACE_S = 10.0
CHANGE_PENDING = "policy or endpoint change: not yet enforced"


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.time()
        self.state = AgentState()
        self._reconcile_wanted = asyncio.Event()
        self._stop = asyncio.Event()
        self.metrics = AgentMetrics()
        self.ads = AdsServer(on_update=self._reconcile_wanted.set, events=xds_counters(self.metrics))
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.envoy = envoy_process(config, self.xds_socket)
        self.source: Source = open_source(config)
        self.datapath: BpfDatapath | None = None
        # Incremental: a policy change compiles and renders only the pods it selects.
        self.compiler, self.audit_compiler = Compiler(), Compiler()  # the second: every policy, for audit mode
        # Read once: Envoy's listeners and the proxy routing serve the same families.
        self.ipv6 = node_has_ipv6(config.proc_sys_net)
        self.renderer = Renderer(self.proxy_ports, "::" if self.ipv6 else "0.0.0.0", MARK_FROM_PROXY)
        self._started_monotonic = time.monotonic()
        self._synced_once = False
        self._change_seen_at: float | None = None  # the oldest policy change Envoy has not yet ACKed
        self.monitoring = Monitoring(
            self.metrics,
            lambda: (self.state.plan, self.state.node.node.ips),
            self.envoy.admin_socket,
            config.l7_access_log_all,
            RuleHits(config.run_dir / "hits.json"),
        )
        self.events = self.monitoring.events

    @property
    def proxy_ports(self) -> dict[str, int]:
        return {INGRESS: self.config.ingress_proxy_port, EGRESS: self.config.egress_proxy_port}

    @property
    def acks(self) -> AckState:
        return self.ads.acks

    @property
    def xds_socket(self) -> Path:
        return self.config.run_dir / "xds.sock"

    @property
    def api_socket(self) -> Path:
        return self.config.run_dir / "agent.sock"

    def stop(self) -> None:
        self._stop.set()

    async def restart_envoy(self, concurrency: int | None = None) -> Handover:
        """A new Envoy beside the running one (with `concurrency` workers, when given); it takes over once it
        holds a whole configuration (the newest, or the last good while the newest is rejected); then the old
        one drains."""
        return await self.envoy.handover(self.ads.holds_whole_configuration, self.ads.drain, concurrency)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # A child compiles the programs (seconds) unless this build's are pinned: off the event loop.
        self.datapath = await asyncio.to_thread(BpfDatapath, self.config.pin_dir, self.config.map_sizes)
        self.monitoring.datapath_loaded(self.datapath.compiled, self.datapath.load_s)
        self.datapath.set_direct_routing(self.config.host_routing == HOST_ROUTING_BPF)
        self.datapath.accelerate_sockets(self.config.sockmap_cgroup)
        self.datapath.set_conntrack_timeouts(self.config.conntrack_timeouts)
        await asyncio.to_thread(prepare_node, self.proxy_ports.values(), self.config.proc_sys_net, self.ipv6)
        self.xds_socket.unlink(missing_ok=True)
        grpc_server = await start_server(
            self.ads, str(self.xds_socket), AccessLogService(on_entry=self.monitoring.on_access_log)
        )
        api_runner = await start_api(AgentViews(self), self.api_socket, self.config.api_address)
        envoy_task = asyncio.create_task(
            self.envoy.run(self.ads.holds_whole_configuration, self.ads.drain), name="envoy"
        )
        events_stop = threading.Event()
        events_thread = threading.Thread(
            target=self.monitoring.read_kernel_events,
            args=(self.datapath, loop, events_stop),
            name="bpf-events",
            daemon=True,
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
            # Envoy's streams never end by themselves: a grace only delays the next agent (Envoy reconnects).
            await grpc_server.stop(grace=0.1)

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
        policies = enforced_policies(policy_set.policies)  # audited ones: reported, not enforced
        plan = self.compiler.compile(policies, node.endpoints, node.node, policy_set.secrets, policy_set.policies)
        if len(policies) < len(policy_set.policies):
            every = self.audit_compiler.compile(policy_set.policies, node.endpoints, node.node, policy_set.secrets)
            plan = with_audit(plan, every)
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
        target = target_of(plan, snapshot)
        self.state.served.add(target.served)
        self.state.plan, self.state.target = plan, target
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
            await self.monitoring.collect_hits(self.datapath, self.acks.connected)
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
        self.monitoring.apply_failed(stage, message)

    async def sync_monitoring(self) -> None:
        await self.monitoring.sync(self.datapath, self.ads.acks)

    def _adoption_grace_over(self) -> bool:
        return time.monotonic() - self._started_monotonic > ADOPTION_GRACE_S

    def _reconcile_datapath(self) -> None:
        """Attach to new interfaces, then sync maps: redirect only what Envoy has ACKed (agent/enforce.py)."""
        plan, datapath, target = self.state.plan, self.datapath, self.state.target
        if plan is None or datapath is None:
            return
        pods = [(endpoint.endpoint.interface, endpoint.endpoint.key) for endpoint in plan.endpoints]
        hooks = [*pods, *((interface, NODE) for interface in self.state.node.interfaces)]
        pending = attach_programs(hooks, self.state.attached, datapath)
        gate = enforcement(target, self.state.served, *self.ads.envoys())
        if not gate.xds_pending and self._change_seen_at is not None:
            self.state.last_enforce_s = round(time.monotonic() - self._change_seen_at, 4)
            self.metrics.policy_to_enforced.observe(self.state.last_enforce_s)
            self._change_seen_at = None
        if self.envoy.adopted and not self._synced_once and gate.xds_pending and not self._adoption_grace_over():
            # An adopted Envoy is reconnecting and enforces what the maps redirect to it: keep the maps as the
            # previous agent left them until Envoy reports what it holds, so nothing is dropped meanwhile.
            waiting = "datapath: waiting for the adopted Envoy to report"
            self._set_pending(target, [*pending, waiting, *gate.xds_pending])
            return
        hit_indexes = self.monitoring.hits.assign(plan, datapath)
        datapath.sync(render_maps(plan, self.proxy_ports, gate.redirectable, self.state.attached, hit_indexes))
        if self.state.apply_error is not None and self.state.apply_error["stage"] == "datapath":
            self.state.apply_error = None
        self._synced_once = True
        self.state.redirected = gate.redirectable
        self._set_pending(target, [*pending, *gate.redirect_pending, *gate.xds_pending])

    def _set_pending(self, target: Target | None, pending: list[str]) -> None:
        # Computed for `target`; if a newer one was published meanwhile, its own reconcile will say.
        if self.state.target is target:
            self.state.pending = pending
            if not pending and self.state.ready_after_s is None:
                self.state.ready_after_s = self.monitoring.first_ready()
