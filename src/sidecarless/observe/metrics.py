"""The agent's Prometheus metrics: `sidecarless_` prefix, base units, `_total` counters, closed label sets.

The only module that imports prometheus_client. Each agent has its own registry (no process globals), so
tests can run several.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Policy changes reach Envoy in milliseconds to a few hundred (5,000 rules); Envoy restarts take longer.
ENFORCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# The Prometheus text format, version 0.0.4: what every Prometheus scrapes (`/metrics`' Content-Type).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The agent process itself, as every Prometheus client shows it: process_resident_memory_bytes,
        # process_cpu_seconds_total, process_open_fds, ...; python_info; python_gc_*.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.policy_to_enforced = Histogram(
            "sidecarless_policy_to_enforced_seconds",
            "Time from a policy or endpoint change being seen to Envoy having ACKed all of it",
            buckets=ENFORCE_BUCKETS,
            registry=self.registry,
        )
        self.xds_responses = Counter(
            "sidecarless_xds_responses_total", "xDS responses sent to Envoy", ["type"], registry=self.registry
        )
        self.xds_acks = Counter(
            "sidecarless_xds_acks_total", "xDS responses Envoy ACKed", ["type"], registry=self.registry
        )
        self.xds_nacks = Counter(
            "sidecarless_xds_nacks_total", "xDS responses Envoy rejected", ["type"], registry=self.registry
        )
        self.drops = Counter(
            "sidecarless_drops_total",
            "Packets the kernel dropped, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.policy_verdicts = Counter(
            "sidecarless_policy_verdicts_total", "New flows a policy allowed, by verdict, while a monitor watches",
            ["verdict"],
            registry=self.registry,
        )  # fmt: skip
        self.audit_events = Counter(
            "sidecarless_audit_events_total",
            "New flows (layer l3l4) and requests (l7) that policies in audit mode would decide otherwise than the "
            "enforced policies: enforced is the verdict they got, audit what every policy would give",
            ["layer", "enforced", "audit"],
            registry=self.registry,
        )
        self.l7_verdicts = Counter(
            "sidecarless_l7_verdicts_total",
            "Requests the proxy decided, by verdict, as logged: every Denied and Error; Forwarded while a monitor "
            "watches or with --l7-access-log all (Envoy's own http.* stats count every request)",
            ["verdict"],
            registry=self.registry,
        )  # fmt: skip
        self.apply_errors = Counter(
            "sidecarless_apply_errors_total",
            "Policy or endpoint sets that could not be applied (the last good one stayed in force), by stage",
            ["stage"],
            registry=self.registry,
        )
        self.conntrack_collected = Counter(
            "sidecarless_conntrack_collected_total", "Expired flows removed from the conntrack table",
            registry=self.registry,
        )  # fmt: skip
        self.envoy_restarts = Counter(
            "sidecarless_envoy_restarts_total", "Envoy restarts since the agent started", registry=self.registry
        )
        self.policy_events = Counter(
            "sidecarless_policy_events_total", "Policy or endpoint changes seen", registry=self.registry
        )
        self.compile_seconds = Histogram(
            "sidecarless_compile_seconds", "Time to compile policies and endpoints into a plan",
            buckets=ENFORCE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.push_seconds = Histogram(
            "sidecarless_push_seconds", "Time to render the plan for Envoy and publish it", buckets=ENFORCE_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.map_entries = Gauge("sidecarless_map_entries", "Entries in each BPF map", ["map"], registry=self.registry)
        self.endpoints = Gauge("sidecarless_endpoints", "Pods on this node", registry=self.registry)
        self.redirects = Gauge(
            "sidecarless_redirects", "Redirects to the proxy switched on in the kernel", registry=self.registry
        )
        self.policies_rejected = Gauge(
            "sidecarless_policies_rejected",
            "Policy files or Kubernetes objects rejected (their last good version in force)",
            registry=self.registry,
        )  # fmt: skip

        self.datapath_load_seconds = Gauge(
            "sidecarless_datapath_load_seconds",
            "Time the agent took to load the datapath at its start (compiling the programs, or opening them pinned)",
            registry=self.registry,
        )  # fmt: skip
        self.datapath_programs_compiled = Gauge(
            "sidecarless_datapath_programs_compiled",
            "1 if this agent compiled the BPF programs at its start, 0 if it opened those pinned for this build",
            registry=self.registry,
        )  # fmt: skip
        self.ready_seconds = Gauge(
            "sidecarless_agent_ready_seconds",
            "Seconds from the agent process's start until it was first ready (0 until then)",
            registry=self.registry,
        )  # fmt: skip

        # Closed label sets, present from the start: a series that appears only once it moves is hard to alert on.
        for type_name in ("cluster", "listener", "route"):
            for counter in (self.xds_responses, self.xds_acks, self.xds_nacks):
                counter.labels(type_name)
        for reason in ("Policy denied", "Proxy unavailable", "Policy denied by denylist"):
            self.drops.labels(reason)
        for verdict in ("Forwarded", "Denied", "Error"):
            self.l7_verdicts.labels(verdict)
        for verdict in ("allow", "redirect"):
            self.policy_verdicts.labels(verdict)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def add_rule_hits(self, rows: Callable[[], list[dict[str, Any]]]) -> None:
        """sidecarless_policy_rule_hits_total from `rows` (agent/hits.py) at each scrape."""
        self.registry.register(_RuleHitsCollector(rows))


class _RuleHitsCollector(Collector):
    """Per rule: its position is a label, so the set grows only with the policies written (bounded)."""

    def __init__(self, rows: Callable[[], list[dict[str, Any]]]) -> None:
        self._rows = rows

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "sidecarless_policy_rule_hits",
            "Flows (layer l3l4, from the kernel) and requests (l7, from Envoy) each rule allowed or denied",
            labels=["namespace", "policy", "rule", "layer", "verdict"],
        )
        for row in self._rows():
            namespace, _, name = str(row["policy"]).rpartition("/")
            for layer, verdict, key in (
                ("l3l4", "allowed", "flows_allowed"), ("l3l4", "denied", "flows_denied"),
                ("l7", "allowed", "requests_allowed"), ("l7", "denied", "requests_denied"),
            ):  # fmt: skip
                family.add_metric([namespace, name, str(row["rule"]), layer, verdict], float(row[key]))
        yield family


def envoy_hit_counters(exposition: str) -> dict[tuple[str, str, str, str], int]:
    """Envoy's hit counters (xds/render.py `_hits_log`) from its Prometheus exposition: (chain, egress rule,
    ingress rule, response code details) -> requests."""
    counters = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name not in ("envoy_sidecarless_hits", "envoy_sidecarless_hits_total"):
                continue
            labels = sample.labels
            key = (labels.get("chain", ""), labels.get("egress", ""), labels.get("ingress", ""),
                   labels.get("details", ""))  # fmt: skip
            counters[key] = int(sample.value)
    return counters


def short_type(type_url: str) -> str:
    """cluster, listener, route: a closed label set instead of type URLs."""
    return {
        "type.googleapis.com/envoy.config.cluster.v3.Cluster": "cluster",
        "type.googleapis.com/envoy.config.listener.v3.Listener": "listener",
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "route",
    }.get(type_url, "other")
