"""Kernel records and Envoy access-log entries as monitor events, their peers named as an operator knows them.
Pure."""

from __future__ import annotations

from sidecarless.observe.events import (
    AUDIT,
    DROP,
    L7,
    POLICY_VERDICT,
    PROTOCOL_NAMES,
    Event,
    peer_of,
    tcp_flag_text,
)
from sidecarless.policy.audit import audit_rule
from sidecarless.policy.model import EGRESS, INGRESS
from sidecarless.policy.plan import REDIRECT, Plan
from sidecarless.redirect import maps
from sidecarless.redirect.maps import ACTION_REDIRECT, DROP_REASONS, KERNEL_EVENT_AUDIT, KERNEL_EVENT_DROP, KernelEvent
from sidecarless.xds.accesslog import HttpLogEntry

IP_ETHERTYPES = (0x0800, 0x86DD)
ICMPV6 = 58
UNREAD_ADDRESS = "::"  # all zero: what the kernel reports for addresses it did not get to read


def kernel_event(raw: KernelEvent, plan: Plan | None, node_ips: tuple[str, ...], age_s: float, now: float) -> Event:
    """`age_s`: how long ago the kernel stamped it (the kernel uses the monotonic clock; the monitor shows
    wall-clock time)."""
    protocol = PROTOCOL_NAMES.get(raw.protocol, str(raw.protocol))
    if raw.ethertype not in IP_ETHERTYPES or (raw.source_ip == UNREAD_ADDRESS and not raw.protocol):
        protocol = f"ethertype {raw.ethertype:#06x}"  # a frame dropped before its addresses were read
    dropped = raw.kind == KERNEL_EVENT_DROP
    if raw.kind == KERNEL_EVENT_AUDIT:
        return _kernel_audit_event(raw, plan, node_ips, protocol, now - age_s)
    return Event(
        time=now - age_s,
        type=DROP if dropped else POLICY_VERDICT,
        source=peer_of(plan, node_ips, raw.source_ip, raw.source_port, raw.source_identity),
        destination=peer_of(plan, node_ips, raw.destination_ip, raw.destination_port, raw.destination_identity),
        protocol=protocol,
        direction="egress" if raw.direction else "ingress",
        reason=DROP_REASONS.get(raw.reason, str(raw.reason)) if dropped else "",
        verdict="" if dropped else ("redirect" if raw.action == ACTION_REDIRECT else "allow"),
        tcp_flags=tcp_flag_text(raw.tcp_flags) if protocol == "tcp" else "",
    )


def access_log_event(entry: HttpLogEntry, plan: Plan | None, node_ips: tuple[str, ...]) -> Event:
    return Event(
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
        host=entry.host,
        headers=entry.headers,
    )


def _kernel_audit_event(
    raw: KernelEvent, plan: Plan | None, node_ips: tuple[str, ...], protocol: str, time: float
) -> Event:
    source = peer_of(plan, node_ips, raw.source_ip, raw.source_port, raw.source_identity)
    destination = peer_of(plan, node_ips, raw.destination_ip, raw.destination_port, raw.destination_identity)
    direction = EGRESS if raw.audit_direction else INGRESS
    pod, peer = (source, destination) if direction == EGRESS else (destination, source)
    rule = ""
    if plan is not None:
        # ICMPv6 is looked up as ICMP (bpf/sidecarless.h).
        policy_protocol = "ICMP" if raw.protocol == ICMPV6 else maps.PROTOCOL_NAMES.get(raw.protocol, "")
        rule = audit_rule(plan, pod.name, direction, peer.identity, policy_protocol, raw.destination_port)
    return Event(
        time=time,
        type=AUDIT,
        source=source,
        destination=destination,
        protocol=protocol,
        direction=direction,
        verdict=_kernel_verdict(raw.reason, raw.action),
        audit=_kernel_verdict(raw.audit_reason, raw.audit_action),
        rule=rule,
        tcp_flags=tcp_flag_text(raw.tcp_flags) if protocol == "tcp" else "",
    )


def _kernel_verdict(reason: int, action: int) -> str:
    if reason:
        return f"drop ({DROP_REASONS.get(reason, str(reason))})"
    return "redirect" if action == ACTION_REDIRECT else "allow"


def denied_rules(entry: HttpLogEntry, plan: Plan | None, node_ips: tuple[str, ...]) -> tuple[str, ...]:
    """The rule items of a request the proxy denied whose HTTP rules let it through on no side: its hit counts
    (`policy hits`). A side whose shadow rules name an HTTP rule did let it through."""
    if plan is None or not entry.details.startswith("rbac_access_denied"):
        return ()
    source = peer_of(plan, node_ips, entry.client_ip, entry.client_port)
    destination = peer_of(plan, node_ips, entry.destination_ip, entry.destination_port)
    sides = [(INGRESS, destination.name, source.identity)]
    if entry.log_name.startswith(EGRESS):
        sides.insert(0, (EGRESS, source.name, destination.identity))
    matched = dict(entry.matched)
    origins: list[str] = []
    for side, pod, peer in sides:
        endpoint = plan.endpoint(pod) if "/" in pod and " " not in pod else None  # a pod's key, not a name
        rule = endpoint.direction(side).verdict(peer, "TCP", entry.destination_port) if endpoint else None
        if side not in matched and rule is not None and rule.action == REDIRECT:
            origins += rule.origins
    return tuple(origins)


def access_log_audit_event(entry: HttpLogEntry, plan: Plan | None, node_ips: tuple[str, ...]) -> Event | None:
    """An audit event for a request whose audit verdict (Envoy's shadow rules) differs from the one it got."""
    if entry.audit is None or plan is None or entry.verdict == "Error":
        return None
    audit = "Forwarded" if entry.audit == "allowed" else "Denied"
    if audit == entry.verdict:
        return None
    source = peer_of(plan, node_ips, entry.client_ip, entry.client_port)
    destination = peer_of(plan, node_ips, entry.destination_ip, entry.destination_port)
    direction = entry.log_name.split("/", 1)[0]
    sides = [(INGRESS, destination, source)]
    if direction == EGRESS:
        sides.insert(0, (EGRESS, source, destination))
    rules = [
        audit_rule(plan, pod.name, side, peer.identity, "TCP", entry.destination_port) for side, pod, peer in sides
    ]
    return Event(
        time=entry.time,
        type=AUDIT,
        source=source,
        destination=destination,
        protocol="tcp",
        direction=direction,
        verdict=entry.verdict,
        method=entry.method,
        path=entry.path,
        status=entry.status,
        audit=audit,
        rule="; ".join(rule for rule in rules if rule),
    )
