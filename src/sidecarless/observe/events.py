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
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

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
        return pod_is(self.source.name, pod), pod_is(self.destination.name, pod)


def pod_is(name: str, pod: str) -> bool:
    """Is `name` (namespace/pod, as events and chains name pods) the pod a user gave as namespace/pod or pod?"""
    return name == pod or name.split("/", 1)[-1] == pod


# Hubble's verdict words for our events: a kernel drop and an L7 denial are DROPPED, a flow sent to the proxy
# REDIRECTED, an allowed flow or forwarded request FORWARDED, a request Envoy could not complete ERROR, what a
# policy in audit mode would decide otherwise AUDIT. An agent event (an input it could not apply) has none.
VERDICTS = ("FORWARDED", "DROPPED", "REDIRECTED", "AUDIT", "ERROR")
_L7_VERDICTS = {"Forwarded": "FORWARDED", "Denied": "DROPPED", "Error": "ERROR"}


def hubble_verdict(event: Event) -> str:
    if event.type == DROP:
        return "DROPPED"
    if event.type == AUDIT:
        return "AUDIT"
    if event.type == POLICY_VERDICT:
        return "REDIRECTED" if event.verdict == "redirect" else "FORWARDED"
    if event.type == L7:
        return _L7_VERDICTS.get(event.verdict, "ERROR")
    return ""


@dataclass(frozen=True)
class EventFilter:
    """`monitor`'s filters, as `hubble observe` has them: every filter given must hold, and a filter given several
    times holds if any of its values does. A pod is `namespace/name` or a name in any namespace; `pods` and
    `namespaces` match either end; an HTTP status is a code (403) or a class (4+ or 4xx)."""

    types: tuple[str, ...] = ()
    from_pods: tuple[str, ...] = ()
    to_pods: tuple[str, ...] = ()
    pods: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    verdicts: tuple[str, ...] = ()
    http_statuses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for kind in self.types:
            if kind not in EVENT_TYPES:
                raise ValueError(f"type {kind!r}: one of {', '.join(EVENT_TYPES)}")
        for verdict in self.verdicts:
            if verdict not in VERDICTS:
                raise ValueError(f"verdict {verdict!r}: one of {', '.join(VERDICTS)}")
        for status in self.http_statuses:
            if not ((status.isdigit() and len(status) == 3) or _status_class(status)):
                raise ValueError(f"http status {status!r}: a code (403) or a class (4+, 4xx)")

    def matches(self, event: Event) -> bool:
        source, destination = event.source.name, event.destination.name
        return (
            (not self.types or event.type in self.types)
            and (not self.from_pods or any(pod_is(source, pod) for pod in self.from_pods))
            and (not self.to_pods or any(pod_is(destination, pod) for pod in self.to_pods))
            and (not self.pods or any(any(event.involves(pod)) for pod in self.pods))
            and (not self.namespaces or bool({_namespace(source), _namespace(destination)} & set(self.namespaces)))
            and (not self.verdicts or hubble_verdict(event) in self.verdicts)
            and (not self.http_statuses or any(_status_is(event.status, s) for s in self.http_statuses))
        )

    # The agent API's query parameters (`/v1/monitor?type=drop&type=l7&from_pod=...`), one per field.
    QUERY: ClassVar[dict[str, str]] = {
        "type": "types",
        "from_pod": "from_pods",
        "to_pod": "to_pods",
        "pod": "pods",
        "namespace": "namespaces",
        "verdict": "verdicts",
        "http_status": "http_statuses",
    }

    @classmethod
    def from_query(cls, query: Iterable[tuple[str, str]]) -> EventFilter:
        """Raises ValueError for a value no event can have. `all` as a type is no filter; `from` and `to` are the
        names earlier clients sent."""
        fields: dict[str, list[str]] = {field: [] for field in cls.QUERY.values()}
        aliases = {"from": "from_pod", "to": "to_pod"}
        for key, value in query:
            field = cls.QUERY.get(aliases.get(key, key))
            if field is not None and not (field == "types" and value == "all"):
                fields[field].append(value.upper() if field == "verdicts" else value)
        return cls(**{field: tuple(values) for field, values in fields.items()})

    def query(self) -> list[tuple[str, str]]:
        return [(key, value) for key, field in self.QUERY.items() for value in getattr(self, field)]


def _namespace(name: str) -> str:
    """A pod's namespace; "" for the node, the world or another node."""
    namespace, separator, _ = name.partition("/")
    return namespace if separator and " " not in namespace else ""


def _status_class(status: str) -> bool:
    return len(status) in (2, 3) and status[0] in "12345" and status[1:] in ("+", "xx", "XX")


def _status_is(code: int, status: str) -> bool:
    if code == 0:
        return False  # not an HTTP event
    return str(code)[0] == status[0] if _status_class(status) else str(code) == status


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
    # What `monitor --last N` can show: Hubble's default ring of 4,095 flows (a few MiB here).
    RECENT = 4095

    def __init__(self) -> None:
        self.recent: deque[Event] = deque(maxlen=self.RECENT)
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
