"""What the monitor sees: kernel drops and verdicts, Envoy's L7 verdicts and the agent's own apply errors, as
events on one hub; and the switches that make the costly ones flow only while somebody watches."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sidecarless.agent.hits import RuleHits
from sidecarless.agent.translate import access_log_audit_event, access_log_event, denied_rules, kernel_event
from sidecarless.envoy.admin import admin_get, admin_post
from sidecarless.envoy.bootstrap import ACCESS_LOG_FORWARDED_KEY
from sidecarless.observe.events import AGENT, AUDIT, DROP, Event, EventHub, Peer
from sidecarless.observe.logs import LogKey
from sidecarless.observe.metrics import AgentMetrics, envoy_hit_counters, short_type
from sidecarless.policy.identity import HOST_IDENTITY
from sidecarless.policy.plan import Plan
from sidecarless.redirect.bpf import BpfDatapath
from sidecarless.redirect.maps import KernelEvent
from sidecarless.xds.accesslog import HttpLogEntry
from sidecarless.xds.acks import AckState, XdsEvents
from sidecarless.xds.render import HITS_STAT, HITS_STAT_PREFIX, hit_rules

log = logging.getLogger(__name__)


def process_age_s() -> float:
    """Seconds since this process started (/proc/self/stat's start time, in clock ticks after boot)."""
    stat = Path("/proc/self/stat").read_text()
    started_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")


def xds_counters(metrics: AgentMetrics) -> XdsEvents:
    """What the xDS server reports, counted per type."""
    return XdsEvents(
        on_response=lambda t: metrics.xds_responses.labels(short_type(t)).inc(),
        on_ack=lambda t: metrics.xds_acks.labels(short_type(t)).inc(),
        on_nack=lambda t, message: metrics.xds_nacks.labels(short_type(t)).inc(),
    )


class Monitoring:
    def __init__(
        self,
        metrics: AgentMetrics,
        names: Callable[[], tuple[Plan | None, tuple[str, ...]]],  # the plan and node addresses that name peers
        envoy_admin_socket: Path,
        l7_access_log_all: bool,
        hits: RuleHits,
    ) -> None:
        self.events = EventHub()
        self.hits = hits
        self._hit_rules: tuple[Plan | None, dict[tuple[str, str, str], str]] = (None, {})
        self._metrics = metrics
        self._names = names
        self._admin_socket = envoy_admin_socket
        self._l7_access_log_all = l7_access_log_all
        # (the ADS connection it was set on, percent): Envoy forgets admin runtime values when it restarts.
        self._access_log_set: tuple[object, int] | None = None

    def datapath_loaded(self, compiled: bool, load_s: float) -> None:
        self._metrics.datapath_load_seconds.set(load_s)
        self._metrics.datapath_programs_compiled.set(1 if compiled else 0)

    def first_ready(self) -> float:
        """The agent is ready for the first time: how long since its process started (imports included)."""
        ready_after_s = round(process_age_s(), 3)
        self._metrics.ready_seconds.set(ready_after_s)
        return ready_after_s

    def read_kernel_events(self, datapath: BpfDatapath, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        """A thread: the BPF ring buffer, each record handed to the event loop."""

        def deliver(event: KernelEvent) -> None:
            loop.call_soon_threadsafe(self.on_kernel_event, event)

        datapath.open_events(deliver)
        while not stop.is_set():
            datapath.poll_events(100)

    def on_kernel_event(self, raw: KernelEvent) -> None:
        age_s = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - raw.timestamp_ns) / 1e9
        event = kernel_event(raw, *self._names(), age_s, time.time())
        if event.type == DROP:
            self._metrics.drops.labels(event.reason).inc()
            log.info("drop", extra={LogKey.EVENT: event.text()})
        elif event.type == AUDIT:
            self._audited(event, "l3l4")
        else:
            self._metrics.policy_verdicts.labels(event.verdict).inc()
        self.events.publish(event)

    def on_access_log(self, entry: HttpLogEntry) -> None:
        event = access_log_event(entry, *self._names())
        self._metrics.l7_verdicts.labels(event.verdict).inc()
        self.events.publish(event)
        self.hits.request_denied(denied_rules(entry, *self._names()))
        audit = access_log_audit_event(entry, *self._names())
        if audit is not None:
            self._audited(audit, "l7")
            self.events.publish(audit)

    def _audited(self, event: Event, layer: str) -> None:
        """Counted and logged whether or not a monitor watches: what audit mode is for."""
        self._metrics.audit_events.labels(layer, event.verdict, event.audit).inc()
        log.info("audit", extra={LogKey.EVENT: event.text()})

    async def collect_hits(self, datapath: BpfDatapath | None, envoy_connected: bool) -> None:
        """The kernel's and Envoy's hit counters into the totals, saved (`policy hits`)."""
        plan = self._names()[0]
        if datapath is not None:
            await asyncio.to_thread(self.hits.collect_kernel, datapath)
        if envoy_connected and plan is not None:
            if self._hit_rules[0] is not plan:
                self._hit_rules = (plan, await asyncio.to_thread(hit_rules, plan))
            try:
                status, body = await admin_get(
                    self._admin_socket, f"/stats/prometheus?filter=^{HITS_STAT_PREFIX}.{HITS_STAT}"
                )
            except OSError as error:
                log.warning("hit counts not read from Envoy", extra={LogKey.ERROR: str(error)})
            else:
                if status == 200:
                    self.hits.collect_envoy(envoy_hit_counters(body), self._hit_rules[1])
        await asyncio.to_thread(self.hits.save)

    def apply_failed(self, stage: str, message: str) -> None:
        node = Peer("", 0, HOST_IDENTITY, "node")
        self.events.publish(Event(time.time(), AGENT, node, node, "", "", message, f"apply failed ({stage})"))

    async def sync(self, datapath: BpfDatapath | None, acks: AckState) -> None:
        """Forwarded requests reach the access log (and the monitor) while a monitor watches, or always when
        the operator asked; denials and errors always do. Policy verdicts of allowed flows likewise. Logging
        every request would cost more than the rest of the L7 path: nobody pays for it while nobody looks."""
        if datapath is not None:
            # Allowed new flows likewise: an event per connection would cost the agent more than the kernel.
            datapath.set_verdict_events(self.events.subscribers > 0)
        percent = 100 if self._l7_access_log_all or self.events.subscribers else 0
        if not acks.connected or self._access_log_set == (acks, percent):
            return
        try:
            status, body = await admin_post(self._admin_socket, f"/runtime_modify?{ACCESS_LOG_FORWARDED_KEY}={percent}")
        except OSError as error:
            log.warning("access log level not set", extra={LogKey.ERROR: str(error)})
            return
        if status != 200:
            log.warning("access log level not set", extra={LogKey.CODE: status, LogKey.ERROR: body.strip()})
            return
        self._access_log_set = (acks, percent)
