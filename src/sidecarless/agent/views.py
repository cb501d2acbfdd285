"""What the agent API shows (api/server.py): status, pods, policies, the kernel's maps, metrics.

Reads the agent's parts; changes nothing but the gauges a scrape brings up to date (and, asked on the Unix
socket, replaces Envoy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Protocol

from sidecarless import __version__
from sidecarless.agent.config import AgentConfig, AgentState
from sidecarless.agent.enforce import enforcement
from sidecarless.agent.monitoring import Monitoring
from sidecarless.envoy.process import EnvoyProcess, Handover, envoy_version
from sidecarless.observe.events import DROP, PROTOCOL_NAMES, Event, EventHub
from sidecarless.observe.impact import impact, read_flows
from sidecarless.observe.metrics import AgentMetrics, short_type
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Policy, Secret, enforced_policies
from sidecarless.policy.plan import Plan
from sidecarless.policy.reader import PolicyFileError
from sidecarless.policy.schema import parse_policy_bytes
from sidecarless.redirect import netlink
from sidecarless.redirect.bpf import BpfDatapath
from sidecarless.redirect.maps import ACTION_NAMES, endpoint_ids
from sidecarless.sources.source import Source
from sidecarless.xds.acks import AckState
from sidecarless.xds.render import LISTENERS


class AgentParts(Protocol):
    """The parts of a running agent that the views read."""

    config: AgentConfig
    state: AgentState
    events: EventHub
    metrics: AgentMetrics
    envoy: EnvoyProcess
    source: Source
    datapath: BpfDatapath | None
    started: float
    monitoring: Monitoring

    @property
    def acks(self) -> AckState: ...

    @property
    def proxy_ports(self) -> dict[str, int]: ...

    async def sync_monitoring(self) -> None: ...

    async def restart_envoy(self, concurrency: int | None = None) -> Handover: ...


def digest_of(accepted: dict[str, str]) -> str:
    return hashlib.sha256(repr(sorted(accepted.items())).encode()).hexdigest()[:16]


def _pods_by_address(plan: Plan) -> dict[str, str]:
    """Every pod's name by its addresses: other nodes' and this node's."""
    pods = dict(plan.remote_pods)
    pods.update({ip: e.endpoint.key for e in plan.endpoints for ip in e.endpoint.ips})
    return pods


def _labels_text(labels: tuple[tuple[str, str], ...]) -> str:
    """Labels as an operator reads them: the pod's own, without the ones Cilium derives for every pod."""
    shown = [(k, v) for k, v in labels if not k.startswith("io.cilium.k8s.policy.")]
    return ",".join(f"{k}={v}" if v else k for k, v in shown)


class AgentViews:
    """The agent as the API sees it (api/server.py's AgentApi)."""

    def __init__(self, agent: AgentParts) -> None:
        self._agent = agent
        self._restarts_counted = 0
        agent.metrics.add_rule_hits(self._hit_rows)

    def _hit_rows(self) -> list[dict[str, Any]]:
        policy_set = self._agent.state.policy_set
        return self._agent.monitoring.hits.rows(policy_set.policies if policy_set else ())

    def policy_impact(self, flows: str, policies: dict[str, str]) -> dict[str, Any]:
        """`policy impact` against this agent: the recorded `flows` decided under the policies in force and under
        `policies` (file name -> text), with this node's pods. ValueError: bad input, with file:line."""
        state = self._agent.state
        if state.policy_set is None:
            raise ValueError("the agent has no policies compiled yet")
        records = read_flows("flows", flows.splitlines())
        proposed: list[Policy] = []
        secrets: list[Secret] = list(state.policy_set.secrets)
        errors: list[str] = []
        for name, text in sorted(policies.items()):
            try:
                documents = parse_policy_bytes(name, text.encode())
            except PolicyFileError as error:
                errors += [str(item) for item in error.errors]
                continue
            proposed += documents.policies
            secrets += documents.secrets
        if errors:
            raise ValueError("\n".join(errors))
        node, every = state.node, state.policy_set.policies
        current = compile_plan(enforced_policies(every), node.endpoints, node.node, state.policy_set.secrets, every)
        new = compile_plan(enforced_policies(proposed), node.endpoints, node.node, secrets, proposed)
        flips = impact(current, new, records, node.node.ips)
        return {"records": len(records), "flips": [flip.as_dict() for flip in flips]}

    async def policy_hits(self) -> dict[str, Any]:
        """Every rule's counts, brought up to date (`policy hits`)."""
        agent = self._agent
        await agent.monitoring.collect_hits(agent.datapath, agent.acks.connected)
        return {"since": agent.monitoring.hits.since, "rules": await asyncio.to_thread(self._hit_rows)}

    @property
    def pending(self) -> list[str]:
        return self._agent.state.pending

    @property
    def envoy_admin_socket(self) -> Path:
        return self._agent.envoy.admin_socket

    async def restart_envoy(self, concurrency: int | None = None) -> dict[str, Any]:
        return dataclasses.asdict(await self._agent.restart_envoy(concurrency))

    def subscribe(self) -> asyncio.Queue[Event]:
        return self._agent.events.subscribe()

    def recent_events(self) -> list[Event]:
        return list(self._agent.events.recent)

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._agent.events.unsubscribe(queue)

    async def sync_monitoring(self) -> None:
        await self._agent.sync_monitoring()

    def metrics(self) -> bytes:
        """The Prometheus exposition, with what is read rather than counted brought up to date."""
        agent = self._agent
        agent.metrics.envoy_restarts.inc(agent.envoy.restarts - self._restarts_counted)
        self._restarts_counted = agent.envoy.restarts
        if agent.datapath is not None:
            for name, fill in agent.datapath.map_fill().items():
                agent.metrics.map_entries.labels(name).set(fill["entries"])
        agent.metrics.endpoints.set(sum(1 for endpoint in agent.state.node.endpoints if endpoint.local))
        agent.metrics.redirects.set(len(agent.state.redirected))
        policy_set = agent.state.policy_set
        agent.metrics.policies_rejected.set(len(policy_set.rejected) if policy_set else 0)
        return agent.metrics.exposition()

    def status(self) -> dict[str, Any]:
        """Every section an operator looks at; runs in a thread (it reads maps and netlink)."""
        agent = self._agent
        state, acks = agent.state, agent.acks
        policy_set, plan = state.policy_set, state.plan
        xds = enforcement(state.target, state.served, acks).xds
        pods = {ip: e.endpoint.key for e in plan.endpoints for ip in e.endpoint.ips} if plan else {}
        # A copy first (one C call, atomic): the loop appends while this thread reads, and a deque changed
        # during iteration raises (a burst of drops when Envoy died made /v1/status answer 500). Only the last 256
        # drops are turned into dicts: the lab polls status while it waits, and the agent keeps 4,095 events.
        recent_drops = [event for event in list(agent.events.recent) if event.type == DROP]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - agent.started, 3),
            "ready": not state.pending,
            "pending": list(state.pending),
            "monitors": agent.events.subscribers,  # while any watches, every request and new flow is reported
            "envoy": {
                "pid": agent.envoy.pid,
                "version": envoy_version(agent.envoy.binary),
                "instance": agent.envoy.instance,
                "restarts": agent.envoy.restarts,
                "workers": None if agent.envoy.external else agent.envoy.concurrency,
                "handovers": agent.envoy.handovers,
                "connected": acks.connected,
                "adopted": agent.envoy.adopted,
                "managed": not agent.envoy.external,
                "rejected": dict(acks.rejected),
            },
            "xds": {
                short_type(type_url): {
                    "state": status.state,
                    "message": status.message,
                    "accepted_version": digest_of(accepted) if (accepted := acks.accepted.get(type_url)) else None,
                    "resources": sorted(acks.accepted.get(type_url, {})),
                    "responses": acks.responses.get(type_url, 0),
                }
                for type_url, status in xds.items()
            },
            "policies": {
                "digest": policy_set.digest if policy_set else None,
                "count": len(policy_set.policies) if policy_set else 0,
                "in_force": sorted({p.key for p in policy_set.policies if not p.audit}) if policy_set else [],
                "audit": sorted({p.key for p in policy_set.policies if p.audit}) if policy_set else [],
                "rejected": {file: [str(error) for error in errors] for file, errors in policy_set.rejected.items()}
                if policy_set
                else {},
                "problems": list(plan.problems) if plan else [],
            },
            "endpoints": self.endpoints(),
            "source": agent.source.status(),
            "ready_after_s": state.ready_after_s,
            "datapath": {
                "host_routing": agent.config.host_routing,
                "sockmap_cgroup": agent.config.sockmap_cgroup,  # socket acceleration; None: off
                "build": agent.datapath.build() if agent.datapath else {},
                "programs": {interface: _programs_on(interface) for interface in sorted(state.attached)},
                "maps": agent.datapath.map_fill() if agent.datapath else {},
                "counters": agent.datapath.counters() if agent.datapath else {},
            },
            "redirects": [
                {
                    "pod": pods.get(ip, ip),
                    "direction": direction,
                    "peer_identity": peer,
                    "protocol": protocol,
                    "ports": f"{low}" if low == high else f"{low}-{high}",
                    "listener": LISTENERS[direction],
                    "proxy_port": agent.proxy_ports[direction],
                }
                for ip, direction, peer, protocol, low, high in sorted(state.redirected)
            ],
            "last_policy_to_enforced_s": state.last_enforce_s,
            "apply_error": state.apply_error,
            "recent_drops": [event.as_dict() for event in recent_drops[-256:]],
            "monitor_events_lost": agent.events.lost,
        }

    def endpoints(self) -> list[dict[str, Any]]:
        plan = self._agent.state.plan
        return [
            {
                "pod": e.endpoint.key,
                "ip": e.endpoint.ip,
                "ip6": e.endpoint.ip6,
                "interface": e.endpoint.interface,
                "identity": e.identity,
                "labels": dict(e.endpoint.labels),
                "ingress_enforced": e.ingress.enforced,
                "egress_enforced": e.egress.enforced,
            }
            for e in (plan.endpoints if plan else ())
        ]

    def identities(self) -> list[dict[str, Any]]:
        """Every identity of the plan (`identity list`, as cilium-dbg): its labels, and the pods of any node and
        the prefixes that have it."""
        plan = self._agent.state.plan
        if plan is None:
            return []
        pods = _pods_by_address(plan)
        holders: dict[int, set[str]] = {}
        for prefix, number in plan.ipcache:
            address = prefix.partition("/")[0]
            holders.setdefault(number, set()).add(pods.get(address, prefix))
        return [
            {
                "identity": identity.number,
                "kind": identity.kind,
                "labels": [f"{key}={value}" if value else key for key, value in identity.labels],
                "holders": sorted(holders.get(identity.number, ())),
            }
            for identity in sorted(plan.identities, key=lambda identity: identity.number)
        ]

    def policies(self) -> dict[str, Any]:
        policy_set = self._agent.state.policy_set
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
        plan, datapath = self._agent.state.plan, self._agent.datapath
        endpoint = plan.endpoint(pod) if plan else None
        if endpoint is None or datapath is None or plan is None:
            return None
        rows = []
        endpoint_id = endpoint_ids(plan)[endpoint.endpoint.key]
        for key, value in sorted(datapath.policy_entries().items()):
            if key.endpoint != endpoint_id:
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
        datapath = self._agent.datapath
        return {"pin_dir": self._agent.config.pin_dir, "maps": datapath.map_fill() if datapath else {}}

    def bpf_ipcache(self) -> list[dict[str, Any]]:
        """The kernel's ipcache, read from the map (`bpf ipcache list`): each prefix, its identity and what that
        identity is."""
        plan, datapath = self._agent.state.plan, self._agent.datapath
        if datapath is None:
            return []
        identities = {identity.number: identity for identity in plan.identities} if plan else {}
        pods = _pods_by_address(plan) if plan else {}
        rows = []
        for prefix, number in sorted(datapath.ipcache_entries().items()):
            identity = identities.get(number)
            address, _, length = prefix.partition("/")
            host = length == ("128" if ":" in address else "32")
            rows.append(
                {
                    "prefix": prefix,
                    "identity": number,
                    "labels": _labels_text(identity.labels) if identity else "?",
                    "pod": pods.get(address, "") if host else "",
                }
            )
        return rows

    def bpf_conntrack(self) -> list[dict[str, Any]]:
        """The kernel's tracked flows (`bpf ct list`)."""
        datapath = self._agent.datapath
        return list(datapath.conntrack_entries()) if datapath else []


def _programs_on(interface: str) -> dict[str, list[str]]:
    try:
        return {
            "ingress": netlink.attached_programs(interface, netlink.TC_INGRESS),
            "egress": netlink.attached_programs(interface, netlink.TC_EGRESS),
        }
    except netlink.InterfaceMissing:
        return {}
