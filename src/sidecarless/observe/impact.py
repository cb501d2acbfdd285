"""`policy impact`: recorded traffic (what `monitor -o json` printed) decided under the policies in force and
under proposed ones, with the same trace engine the differential test holds to the datapath; what would flip,
grouped. Pure: it takes the recorded lines and two plans.

A record is a flow or a request: a kernel drop (of a SYN, for TCP) or policy verdict (a new flow; its
retransmissions are one flow), or Envoy's L7 verdict of a request (method, path, host and the headers any rule
names, as logged). A kernel record of a flow sent to the proxy stands for nothing by itself: its requests are
recorded as L7 events.
A flow whose port the proposed policies would send to the proxy, recorded without its requests, flips to
"proxy": its requests will be decided by the L7 rules named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sidecarless.observe.events import DROP, L7, POLICY_VERDICT, peer_of
from sidecarless.policy.plan import Plan
from sidecarless.policy.trace import ALLOWED, DENIED, FORWARDED, Request, Trace, trace

PROXY = "proxy"  # sent to the proxy, the request unknown: the L7 rules will decide
POLICY_DROP_REASONS = ("Policy denied", "Policy denied by denylist")
PORT_PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP"}
_ID_SEGMENT = re.compile(r"^(?:\d+|[0-9a-fA-F]{16,}|[0-9a-fA-F-]{36})$")


class FlowsFileError(ValueError):
    """A line of the flows file that is not a monitor event: `file:line: message`."""


@dataclass(frozen=True)
class Recorded:
    """One flow or request as recorded."""

    source: str  # address
    destination: str
    port: int
    protocol: str  # TCP, UDP, SCTP
    request: Request | None  # None: a kernel record


@dataclass(frozen=True)
class Flip:
    """Records of one group that a proposed policy set decides otherwise."""

    source: str  # as an operator names it: namespace/pod, world (CIDR), ...
    destination: str
    port: int
    protocol: str
    method: str  # "" for kernel records
    path: str  # the path pattern: segments that look like ids are *
    before: str  # the trace's verdict (dropped, allowed, forwarded, denied, rejected), or proxy
    after: str
    before_rules: tuple[str, ...]
    after_rules: tuple[str, ...]
    count: int

    def as_dict(self) -> dict[str, object]:
        return {
            "from": self.source,
            "to": self.destination,
            "port": self.port,
            "protocol": self.protocol,
            "method": self.method,
            "path": self.path,
            "before": self.before,
            "after": self.after,
            "before_rules": list(self.before_rules),
            "after_rules": list(self.after_rules),
            "count": self.count,
        }

    @staticmethod
    def from_dict(value: dict[str, Any]) -> Flip:
        return Flip(
            value["from"], value["to"], value["port"], value["protocol"], value["method"], value["path"],
            value["before"], value["after"], tuple(value["before_rules"]), tuple(value["after_rules"]), value["count"],
        )  # fmt: skip

    def text(self) -> str:
        request = f" {self.method} {self.path}" if self.method else ""
        return (
            f"{self.count:>6}  {self.source} -> {self.destination}:{self.port}/{self.protocol.lower()}{request}: "
            f"{self.before} ({_rules_text(self.before_rules)}) => {self.after} ({_rules_text(self.after_rules)})"
        )


def _rules_text(rules: tuple[str, ...]) -> str:
    return ", ".join(rules) if rules else "not enforced"


def read_flows(label: str, lines: Iterable[str]) -> list[Recorded]:
    """The records of `monitor -o json` lines that policy decides; a kernel record once per flow. Events of
    other kinds (agent, audit, drops before policy) are skipped; a line that is not an event is an error."""
    records: list[Recorded] = []
    seen_flows: set[tuple[object, ...]] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            kind, source, destination = event["type"], event["source"], event["destination"]
            protocol = PORT_PROTOCOLS.get(str(event.get("protocol", "")))
            flow = (source["ip"], int(source["port"]), destination["ip"], int(destination["port"]), protocol)
        except (ValueError, KeyError, TypeError) as error:
            raise FlowsFileError(f"{label}:{number}: not a monitor event (monitor -o json): {error}") from None
        if protocol is None:
            continue  # ICMP, or a frame dropped before its addresses were read
        if kind == L7 and event.get("verdict") in ("Forwarded", "Denied"):
            headers = tuple((str(name), str(value)) for name, value in event.get("headers") or ())
            request = Request(str(event["method"]), str(event["path"]), str(event.get("host") or "") or None, headers)
            records.append(Recorded(flow[0], flow[2], flow[3], protocol, request))
            continue
        # A TCP drop opens a flow only with a SYN: any other packet belongs to a flow decided again after a
        # policy change (its end, or a reply), which the drop of its SYN or its verdict already stands for.
        opening = protocol != "TCP" or event.get("tcp_flags") == "SYN"
        decided = (kind == DROP and opening and event.get("reason") in POLICY_DROP_REASONS) or (
            kind == POLICY_VERDICT and event.get("verdict") == "allow"
        )
        if decided and flow not in seen_flows:
            seen_flows.add(flow)
            records.append(Recorded(flow[0], flow[2], flow[3], protocol, None))
    return records


def impact(current: Plan, proposed: Plan, records: list[Recorded], node_ips: tuple[str, ...] = ()) -> list[Flip]:
    """The groups of records whose verdict flips, most records first."""
    groups: dict[tuple[object, ...], Flip] = {}
    for record in records:
        before, after = _decide(current, record), _decide(proposed, record)
        if _passes(before) == _passes(after):
            continue
        source = peer_of(current, node_ips, record.source, 0).name
        destination = peer_of(current, node_ips, record.destination, 0).name
        method = record.request.method if record.request is not None else ""
        path = path_pattern(record.request.path) if record.request is not None else ""
        key = (source, destination, record.port, record.protocol, method, path, _outcome(before), _outcome(after))
        found = groups.get(key)
        count = found.count + 1 if found is not None else 1
        groups[key] = Flip(
            source, destination, record.port, record.protocol, method, path,
            _outcome(before), _outcome(after), before.rules, after.rules, count,
        )  # fmt: skip
    return sorted(groups.values(), key=lambda flip: (-flip.count, flip.source, flip.destination, flip.port, flip.path))


def _decide(plan: Plan, record: Recorded) -> Trace:
    return trace(plan, record.source, record.destination, record.port, record.protocol, record.request)


def _outcome(result: Trace) -> str:
    """The trace's verdict; for a flow recorded without its requests that the proxy would decide, PROXY."""
    return PROXY if result.verdict == DENIED and result.status is None else result.verdict


def _passes(result: Trace) -> bool | None:
    """Whether the flow or request gets through (None: its requests will be decided by L7 rules). Through the
    kernel or through the proxy is the same to the client: that alone is no flip."""
    outcome = _outcome(result)
    return None if outcome == PROXY else outcome in (ALLOWED, FORWARDED)


def path_pattern(path: str) -> str:
    """The path without its query, segments that look like ids (numbers, long hex, UUIDs) as *."""
    segments = path.partition("?")[0].split("/")
    return "/".join("*" if _ID_SEGMENT.match(segment) else segment for segment in segments)
