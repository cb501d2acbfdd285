"""Kernel records and Envoy access-log entries as monitor events, their peers named as an operator knows them.
Pure."""

from __future__ import annotations

from sidecarless.observe.events import DROP, L7, POLICY_VERDICT, PROTOCOL_NAMES, Event, peer_of, tcp_flag_text
from sidecarless.policy.plan import Plan
from sidecarless.redirect.maps import ACTION_REDIRECT, DROP_REASONS, KERNEL_EVENT_DROP, KernelEvent
from sidecarless.xds.accesslog import HttpLogEntry

IP_ETHERTYPES = (0x0800, 0x86DD)
UNREAD_ADDRESS = "::"  # all zero: what the kernel reports for addresses it did not get to read


def kernel_event(raw: KernelEvent, plan: Plan | None, node_ips: tuple[str, ...], age_s: float, now: float) -> Event:
    """`age_s`: how long ago the kernel stamped it (the kernel uses the monotonic clock; the monitor shows
    wall-clock time)."""
    protocol = PROTOCOL_NAMES.get(raw.protocol, str(raw.protocol))
    if raw.ethertype not in IP_ETHERTYPES or (raw.source_ip == UNREAD_ADDRESS and not raw.protocol):
        protocol = f"ethertype {raw.ethertype:#06x}"  # a frame dropped before its addresses were read
    dropped = raw.kind == KERNEL_EVENT_DROP
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
    )
