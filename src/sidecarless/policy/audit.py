"""Audit mode: the enforced plan and the audit plan as one plan the datapath and Envoy apply. Pure.

The enforced plan is compiled from the policies not in audit mode, the audit plan from all of them (with the
same identities: compile.py's `population_policies`). Where a pod's verdicts differ, its entries carry both:
the kernel enforces the first and reports the second where they differ; Envoy enforces the first and
evaluates the second as RBAC shadow rules. Where the audit verdict has L7 rules and the enforced one allows
the port, the port goes to the proxy with every request passing, so that Envoy sees what the audited rules
would decide (a port under an audited L7 rule is expected to carry HTTP, as when it is enforced).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from sidecarless.policy.model import HttpRule
from sidecarless.policy.plan import (
    ALLOW,
    NONE,
    REDIRECT,
    AuditVerdict,
    DirectionPolicy,
    Plan,
    PolicyEntry,
)

EVERY_REQUEST = (HttpRule(),)
_PORT_SPACE = (0, 65535)


def with_audit(enforced: Plan, audit: Plan | None) -> Plan:
    """`enforced` with the audit verdicts of `audit` (None: no policy is in audit mode) on the entries of the
    pods whose verdicts differ; the other pods are the enforced plan's own objects."""
    if audit is None:
        return enforced
    audited = {endpoint.endpoint.key: endpoint for endpoint in audit.endpoints}
    endpoints = []
    for endpoint in enforced.endpoints:
        other = audited.get(endpoint.endpoint.key)
        if other is not None:
            ingress, egress = _merge(endpoint.ingress, other.ingress), _merge(endpoint.egress, other.egress)
            if ingress is not endpoint.ingress or egress is not endpoint.egress:
                selected_by = tuple(sorted({*endpoint.selected_by, *other.selected_by}))
                endpoint = replace(endpoint, ingress=ingress, egress=egress, selected_by=selected_by)
        endpoints.append(endpoint)
    return replace(enforced, endpoints=tuple(endpoints))


def _merge(enforced: DirectionPolicy, audit: DirectionPolicy) -> DirectionPolicy:
    if _same_verdicts(enforced, audit):
        return enforced
    entries: list[PolicyEntry] = []
    identities = sorted({entry.peer_identity for entry in (*enforced.entries, *audit.entries)})
    for identity in identities:
        own = [e for e in (*enforced.entries, *audit.entries) if e.peer_identity == identity]
        enforced_entries, audit_entries = enforced.effective(identity), audit.effective(identity)
        for protocol in sorted({entry.protocol for entry in own}):
            for low, high in _intervals([*enforced_entries, *audit_entries], protocol):
                if not any(e.protocol == protocol and e.low <= low and high <= e.high for e in own):
                    continue  # neither plan has an entry of this peer's own here: the any-peer entries answer
                entry = _entry(
                    identity,
                    protocol,
                    low,
                    high,
                    _covering(enforced_entries, protocol, low),
                    _covering(audit_entries, protocol, low),
                    enforced.enforced,
                    audit.enforced,
                )
                previous = entries[-1] if entries else None
                if previous is not None and replace(previous, low=low, high=high) == entry and previous.high + 1 == low:
                    entries[-1] = replace(previous, high=high)
                else:
                    entries.append(entry)
    return DirectionPolicy(enforced.enforced, tuple(entries), audit_enforced=audit.enforced)


def _same_verdicts(enforced: DirectionPolicy, audit: DirectionPolicy) -> bool:
    """Equal entries and default: nothing to audit. Which rule items decide does not change a verdict."""
    return enforced.enforced == audit.enforced and _verdicts(enforced) == _verdicts(audit)


def _verdicts(rules: DirectionPolicy) -> list[PolicyEntry]:
    return [replace(entry, origins=()) for entry in rules.entries]


def _intervals(entries: list[PolicyEntry], protocol: str) -> list[tuple[int, int]]:
    bounds = {_PORT_SPACE[0], _PORT_SPACE[1] + 1}
    for entry in entries:
        if entry.protocol == protocol:
            bounds |= {entry.low, entry.high + 1}
    return [(low, high - 1) for low, high in itertools.pairwise(sorted(bounds))]


def _covering(entries: list[PolicyEntry], protocol: str, port: int) -> PolicyEntry | None:
    return next((e for e in entries if e.protocol == protocol and e.low <= port <= e.high), None)


def _entry(
    identity: int,
    protocol: str,
    low: int,
    high: int,
    enforced: PolicyEntry | None,
    audit: PolicyEntry | None,
    enforced_default_deny: bool,
    audit_default_deny: bool,
) -> PolicyEntry:
    action = enforced.action if enforced else NONE if enforced_default_deny else ALLOW
    verdict = AuditVerdict(
        audit.action if audit else NONE if audit_default_deny else ALLOW,
        audit.http if audit else (),
        audit.origins if audit else (),
    )
    http = enforced.http if enforced else ()
    if action == ALLOW and verdict.action == REDIRECT:
        action, http, verdict = REDIRECT, EVERY_REQUEST, replace(verdict, proxied_for_audit=True)
    return PolicyEntry(identity, protocol, low, high, action, http, enforced.origins if enforced else (), verdict)


def audit_view(entry: PolicyEntry) -> PolicyEntry | None:
    """A redirected entry as the audit verdict sees its requests: the audited L7 rules, every request (an L3/L4
    allow), or none (None: a deny). An entry without an audit verdict is its own."""
    if entry.audit is None:
        return entry
    if entry.audit.action == REDIRECT:
        return replace(entry, http=entry.audit.http, origins=entry.audit.origins, audit=None)
    if entry.audit.action == ALLOW:
        return replace(entry, http=EVERY_REQUEST, origins=entry.audit.origins, audit=None)
    return None


def audit_rule(plan: Plan, pod: str, direction: str, peer_identity: int, protocol: str, port: int) -> str:
    """The rule items that decide the audit verdict of a pod's traffic in a direction ("" where no audited
    policy changes that direction): those of the entry, or the default deny of the policies selecting it."""
    endpoint = next((e for e in plan.endpoints if e.endpoint.key == pod), None)  # by key: "node" may be a pod's name
    if endpoint is None:
        return ""
    rules = endpoint.direction(direction)
    if rules.audit_enforced is None:
        return ""
    entry = rules.verdict(peer_identity, protocol, port)
    verdict = entry.audit if entry is not None else None
    if verdict is not None and verdict.origins:
        return ", ".join(verdict.origins)
    if (verdict.action if verdict is not None else NONE if rules.audit_enforced else ALLOW) == NONE:
        selecting = sorted({key for key, selected in endpoint.selected_by if selected == direction})
        return f"default deny of {direction} of {pod} (selected by {', '.join(selecting)})"
    return f"{direction} of {pod} not enforced"
