"""What `sidecarless monitor` shows: kernel drops and policy verdicts, and Envoy's L7 verdicts; the hub that
fans them out to monitor streams.

Text lines are shaped like `cilium monitor` and `hubble observe`:

    xx drop (Policy denied) production/dev-tool:41234 (identity 4711) -> production/billing-api:8080 tcp SYN
    -> policy-verdict redirect production/prometheus:40312 (identity 58145) -> production/billing-api:8080 tcp
    <- http production/prometheus -> production/billing-api:8080 POST /metrics => 403 Denied (0.4 ms)
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from sidecarless.policy.identity import REMOTE_NODE_IDENTITY, WORLD_IDENTITY
from sidecarless.policy.plan import Plan, identity_of_address

DROP = "drop"
POLICY_VERDICT = "policy-verdict"
L7 = "l7"
AGENT = "agent"  # the agent itself: an input it could not apply
AUDIT = "audit"  # what policies in audit mode would have decided otherwise (policy/audit.py)
EVENT_TYPES = (DROP, POLICY_VERDICT, L7, AUDIT, AGENT)
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
TCP_FLAG_NAMES = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"))


@dataclass(frozen=True)
class Peer:
    ip: str
    port: int
    identity: int
    name: str  # namespace/pod, "node", "world" or a CIDR label

    def text(self, with_identity: bool = True) -> str:
        identity = f" (identity {self.identity})" if with_identity else ""
        return f"{self.name}:{self.port}{identity}"


@dataclass(frozen=True)
class Event:
    time: float  # seconds since the epoch
    type: str  # DROP, POLICY_VERDICT, L7 or AGENT
    source: Peer
    destination: Peer
    protocol: str
    direction: str  # the policy that decided: ingress or egress
    reason: str = ""  # drop: Policy denied, Proxy unavailable, ...
    verdict: str = ""  # policy-verdict: allow, redirect; l7: Forwarded, Denied, Error
    tcp_flags: str = ""
    method: str = ""
    path: str = ""
    status: int = 0
    latency_ms: float = 0.0
    # An audit event: `verdict` is the enforced one, `audit` what every policy, audited ones included, would
    # give, `rule` the rule items that decide it.
    audit: str = ""
    rule: str = ""
    # An L7 event: what rules can match on besides method and path (`policy impact` replays it).
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        if self.type == DROP:
            flags = f" {self.tcp_flags}" if self.tcp_flags else ""
            return f"xx drop ({self.reason}) {self.source.text()} -> {self.destination.text()} {self.protocol}{flags}"
        if self.type == AGENT:
            return f"!! agent {self.verdict}: {self.reason}"
        if self.type == AUDIT:
            request = f" {self.method} {self.path}" if self.method else ""
            return (
                f"~~ audit {self.source.text(False)} -> {self.destination.text(False)} {self.protocol}{request}: "
                f"{self.verdict}, would be {self.audit} by {self.rule}"
            )
        if self.type == POLICY_VERDICT:
            return f"-> policy-verdict {self.verdict} {self.source.text()} -> {self.destination.text()} {self.protocol}"
        return (
            f"<- http {self.source.name} -> {self.destination.name}:{self.destination.port} {self.method} "
            f"{self.path} => {self.status} {self.verdict} ({self.latency_ms:.1f} ms)"
        )

    def involves(self, pod: str) -> tuple[bool, bool]:
        """(is the source, is the destination) for a pod given as name or namespace/name."""
        return _is(self.source.name, pod), _is(self.destination.name, pod)


def _is(name: str, pod: str) -> bool:
    return name == pod or name.split("/", 1)[-1] == pod


def matches(event: Event, kind: str, source: str | None, destination: str | None) -> bool:
    """The monitor's filters: --type (drop, l7, policy-verdict, agent, all), --from POD, --to POD."""
    if kind != "all" and event.type != kind:
        return False
    if source is not None and not _is(event.source.name, source):
        return False
    return destination is None or _is(event.destination.name, destination)


def peer_of(plan: Plan | None, node_ips: tuple[str, ...], ip: str, port: int, identity: int | None = None) -> Peer:
    """A peer named as an operator knows it: the pod (this node's or another's), the node, another node, or the
    world (with its CIDR)."""
    if plan is not None:
        endpoint = next((e for e in plan.endpoints if ip in e.endpoint.ips), None)
        if endpoint is not None:
            return Peer(ip, port, endpoint.identity, endpoint.endpoint.key)
    if ip in node_ips:
        return Peer(ip, port, 1, "node")
    if identity is None:
        identity = identity_of_address(plan, ip) if plan is not None else WORLD_IDENTITY
    remote = plan.remote_pod(ip) if plan is not None else None
    if remote is not None:
        return Peer(ip, port, identity, remote)
    if identity == REMOTE_NODE_IDENTITY:
        return Peer(ip, port, identity, f"remote-node ({ip})")
    cidr = plan.identity(identity) if plan is not None else None
    if cidr is not None and cidr.prefix is not None:
        return Peer(ip, port, identity, f"world ({ip} in {cidr.prefix})")
    return Peer(ip, port, identity if identity is not None else WORLD_IDENTITY, f"world ({ip})")


def tcp_flag_text(flags: int) -> str:
    return "|".join(name for bit, name in TCP_FLAG_NAMES if flags & bit)


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
