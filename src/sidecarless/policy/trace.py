"""The offline verdict: what the datapath and Envoy decide for one flow or request, and which rules decided.

Pure. It walks the same Plan the agent renders for the kernel and for Envoy, with the same lookups (the
peer's own entry, else the any-peer entry; egress of the source, then ingress of the destination) and the
same HTTP matching as the generated RBAC (RE2 full match; the path without its query string, normalised
as Envoy normalises it). A differential test holds it to the real datapath.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

import re2

from sidecarless.policy.identity import HOST_IDENTITY
from sidecarless.policy.model import EGRESS, INGRESS, HttpRule
from sidecarless.policy.plan import DENY, REDIRECT, EndpointPolicy, Plan, PolicyEntry, identity_of_address

DROPPED = "dropped"
FORWARDED = "forwarded"  # through the proxy, the request allowed
DENIED = "denied"  # by the proxy: HTTP 403
REJECTED = "rejected"  # by the proxy before policy: a path Envoy refuses (HTTP 400)
ALLOWED = "allowed"  # in the kernel, never seen by the proxy

ENVOY_SANITIZED = frozenset({
    "x-envoy-decorator-operation", "x-envoy-downstream-service-cluster", "x-envoy-downstream-service-node",
    "x-envoy-expected-rq-timeout-ms", "x-envoy-external-address", "x-envoy-force-trace", "x-envoy-internal",
    "x-envoy-ip-tags", "x-envoy-max-retries", "x-envoy-retry-grpc-on", "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name", "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response", "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-stream-duration-ms",
})  # fmt: skip
_ESCAPED_SLASH = re.compile(r"%(2f|5c)", re.IGNORECASE)
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@dataclass(frozen=True)
class Request:
    method: str = "GET"
    path: str = "/"
    host: str | None = None  # default: destination:port, as curl sends it
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Trace:
    verdict: str  # DROPPED, ALLOWED, FORWARDED, DENIED, REJECTED
    status: int | None  # the HTTP status the client sees (None: no HTTP answer, or not HTTP)
    proxied: tuple[str, ...]  # which directions sent it through the proxy
    reason: str
    steps: tuple[str, ...]
    backend_headers: tuple[tuple[str, str], ...] | None = None  # after header actions, when forwarded
    # With policies in audit mode: what all of them, audited ones included, would decide (not enforced).
    audit: Trace | None = None
    rules: tuple[str, ...] = ()  # the rule items that decided, or the default deny that did
    http_rules: tuple[str, ...] = ()  # forwarded: the HTTP rule that matched on each side (HttpRule.origin)

    def as_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "status": self.status,
            "proxied": list(self.proxied),
            "reason": self.reason,
            "steps": list(self.steps),
            "backend_headers": dict(self.backend_headers) if self.backend_headers is not None else None,
            "rules": list(self.rules),
            "http_rules": list(self.http_rules),
            **({"audit": self.audit.as_dict()} if self.audit is not None else {}),
        }

    @property
    def passes(self) -> bool:
        return self.verdict in (ALLOWED, FORWARDED)

    @property
    def audit_differs(self) -> bool:
        """The audited policies would let through what is now blocked, or block what now passes."""
        return self.audit is not None and self.audit.passes != self.passes


@dataclass
class _Walk:
    steps: list[str] = field(default_factory=list)


def trace_with_audit(
    plan: Plan,
    audit_plan: Plan | None,
    source: str,
    destination: str,
    port: int,
    protocol: str = "TCP",
    request: Request | None = None,
    family: int | None = None,
) -> Trace:
    """The enforced verdict (`plan`: the policies not in audit mode) and, when some policy is in audit mode,
    the audit verdict (`audit_plan`: every policy) beside it."""
    enforced = trace(plan, source, destination, port, protocol, request, family)
    if audit_plan is None:
        return enforced
    return replace(enforced, audit=trace(audit_plan, source, destination, port, protocol, request, family))


def trace(
    plan: Plan,
    source: str,
    destination: str,
    port: int,
    protocol: str = "TCP",
    request: Request | None = None,
    family: int | None = None,
) -> Trace:
    """`source`/`destination`: a pod (name or namespace/name) or an address. `request`: None for a plain
    TCP/UDP exchange. `family` (4 or 6): the flow's; by default that of an address given, else IPv4 where the
    pods have it. The verdict is the same in both families; this says which addresses the flow carries."""
    walk = _Walk()
    given = {ipaddress.ip_address(ref).version for ref in (source, destination) if _is_address(ref)}
    if len(given) > 1 or (family is not None and given and family not in given):
        raise ValueError("a flow has one address family: the addresses given are of different ones")
    family = family or (given.pop() if given else None)
    source_pod, source_ip = _resolve(plan, source, family)
    destination_pod, destination_ip = _resolve(plan, destination, family)
    source_identity = source_pod.identity if source_pod else identity_of_address(plan, source_ip)
    destination_identity = destination_pod.identity if destination_pod else identity_of_address(plan, destination_ip)
    source_name, destination_name = (
        _name(plan, source, source_identity),
        _name(plan, destination, destination_identity),
    )
    walk.steps.append(f"{source_name} -> {destination_name}:{port}/{protocol}")

    if source_ip == destination_ip:
        # A pod reaching its own address stays on its loopback; it never passes the node.
        walk.steps.append("to itself: stays inside the pod, always allowed")
        return Trace(ALLOWED, None, (), "", tuple(walk.steps))
    if source_identity == HOST_IDENTITY:
        # The node's own traffic never passes the pods' hooks: policy cannot lock the node out (POLICY.md).
        walk.steps.append("from the node itself: always allowed")
        return Trace(ALLOWED, None, (), "", tuple(walk.steps))

    decisions: dict[str, PolicyEntry | None] = {}
    for direction, pod, peer in (
        (EGRESS, source_pod, destination_identity),
        (INGRESS, destination_pod, source_identity),
    ):
        if pod is None:
            continue
        rules = pod.direction(direction)
        entry = rules.verdict(peer, protocol, port)
        decisions[direction] = entry
        if entry is None and rules.enforced:
            walk.steps.append(f"{direction} of {pod.endpoint.key}: default deny, no rule allows it")
            default_deny = (f"default deny of {direction} of {pod.endpoint.key}",)
            return Trace(DROPPED, None, (), "Policy denied", tuple(walk.steps), rules=default_deny)
        if entry is None:
            walk.steps.append(f"{direction} of {pod.endpoint.key}: not enforced")
            continue
        walk.steps.append(f"{direction} of {pod.endpoint.key}: {entry.action} by {', '.join(entry.origins)}")
        if entry.action == DENY:
            return Trace(DROPPED, None, (), "Policy denied by denylist", tuple(walk.steps), rules=entry.origins)

    redirected = tuple(d for d in (EGRESS, INGRESS) if (e := decisions.get(d)) is not None and e.action == REDIRECT)
    if not redirected:
        allowing = tuple(origin for entry in decisions.values() if entry is not None for origin in entry.origins)
        return Trace(ALLOWED, None, (), "", tuple(walk.steps), rules=allowing)
    l7_rules = tuple(origin for d in redirected if (e := decisions[d]) is not None for origin in e.origins)
    if request is None:
        walk.steps.append("the port is governed by L7 rules: the proxy answers non-HTTP traffic by closing")
        return Trace(DENIED, None, redirected, "not HTTP", tuple(walk.steps), rules=l7_rules)

    if "#" in request.path:
        walk.steps.append(f"path {request.path!r}: a fragment in the request target, rejected before policy")
        return Trace(REJECTED, 400, redirected, "fragment in request target", tuple(walk.steps), rules=l7_rules)
    normalized = normalize_path(request.path)
    if normalized is None:
        walk.steps.append(f"path {request.path!r}: escaped slash, rejected before policy")
        return Trace(REJECTED, 400, redirected, "escaped slash in path", tuple(walk.steps), rules=l7_rules)
    underscored = sorted({name for name, _ in request.headers if "_" in name})
    if underscored:
        walk.steps.append(f"header {underscored[0]!r}: an underscore in a header name, rejected before policy")
        return Trace(REJECTED, 400, redirected, "underscore in header name", tuple(walk.steps), rules=l7_rules)
    # Envoy drops these from a request it takes as external, as it takes every pod's (its sanitizing), before
    # any filter sees it: a client cannot steer its retries or timeouts.
    headers = [
        (name.lower(), value)
        for name, value in request.headers
        if name.lower() != "host" and name.lower() not in ENVOY_SANITIZED
    ]
    given_host = next((value for name, value in request.headers if name.lower() == "host"), None)
    headers.append((":authority", request.host or given_host or f"{destination}:{port}"))
    matched_rules = []
    for direction in redirected:
        entry = decisions[direction]
        assert entry is not None
        matched = next((rule for rule in entry.http if _matches(rule, request.method, normalized, headers)), None)
        if matched is None:
            walk.steps.append(f"{direction} L7: no HTTP rule matches {request.method} {normalized}")
            return Trace(DENIED, 403, redirected, "Access denied", tuple(walk.steps), rules=entry.origins)
        walk.steps.append(f"{direction} L7: {request.method} {normalized} matches {_describe(matched)}")
        matched_rules.append(matched)
    # Header actions run after both checks, which see the request as the client sent it.
    for matched in matched_rules:
        headers = _apply_mismatch_actions(matched, headers)
    backend = tuple((name, value) for name, value in headers if not name.startswith(":"))
    matched_at = tuple(rule.origin for rule in matched_rules)
    return Trace(FORWARDED, 200, redirected, "", tuple(walk.steps), backend, rules=l7_rules, http_rules=matched_at)


def _is_address(reference: str) -> bool:
    try:
        ipaddress.ip_address(reference)
    except ValueError:
        return False
    return True


def _resolve(plan: Plan, reference: str, family: int | None) -> tuple[EndpointPolicy | None, str]:
    pod = plan.endpoint(reference)
    if pod is not None:
        if reference in pod.endpoint.ips:
            return pod, reference
        # The pod's address of the flow's family; without one, its IPv4 one (its IPv6 one if it has no other).
        of_family = [ip for ip in pod.endpoint.ips if family is None or (":" in ip) == (family == 6)]
        if not of_family:
            raise ValueError(f"{pod.endpoint.key} has no IPv{family} address")
        return pod, of_family[0]
    if not _is_address(reference):
        raise ValueError(f"{reference!r} is neither a pod of the plan nor an IP address")
    return None, reference


def _name(plan: Plan, reference: str, identity: int) -> str:
    known = plan.identity(identity)
    kind = f"{known.kind} " if known is not None and known.kind != "pod" else ""
    return f"{reference} ({kind}identity {identity})"


def normalize_path(path: str) -> str | None:
    """The path Envoy matches and forwards: query removed, escaped slashes rejected (None), percent-encoded
    unreserved characters decoded, dot segments removed (RFC 3986), repeated slashes merged."""
    path = path.partition("?")[0]
    if _ESCAPED_SLASH.search(path):
        return None

    def decode(match: re.Match[str]) -> str:
        character = chr(int(match.group(1), 16))
        return character if character in _UNRESERVED else f"%{match.group(1).upper()}"

    path = _PERCENT.sub(decode, path)
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
            continue
        if segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
            continue
        output.append(segment)
    normalized = "/".join(output)
    if not normalized.startswith("/"):
        normalized = "/" + normalized
    return re.sub(r"/{2,}", "/", normalized)


def _matches(rule: HttpRule, method: str, path: str, headers: list[tuple[str, str]]) -> bool:
    if rule.method is not None and not re2.fullmatch(rule.method, method):
        return False
    if rule.path is not None and not re2.fullmatch(rule.path, path):
        return False
    values = _header_values(headers)
    if rule.host is not None and not re2.fullmatch(rule.host, values.get(":authority", "")):
        return False
    for header in rule.headers:
        if header.mismatch is not None:
            continue
        if header.name not in values:
            return False
        # A header sent more than once: every copy must have the value (render.py's rule).
        if header.value is not None and any(v != header.value for n, v in headers if n == header.name):
            return False
    return True


def _header_values(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Envoy's view of a header with several values: joined with commas."""
    values: dict[str, str] = {}
    for name, value in headers:
        values[name] = f"{values[name]},{value}" if name in values else value
    return values


def _apply_mismatch_actions(rule: HttpRule, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for header in rule.headers:
        if header.mismatch is None or header.value is None:
            continue
        if _header_values(headers).get(header.name) == header.value:
            continue
        if header.mismatch == "REPLACE":
            headers = [(n, v) for n, v in headers if n != header.name] + [(header.name, header.value)]
        elif header.mismatch == "ADD":
            headers = [*headers, (header.name, header.value)]
        elif header.mismatch == "DELETE":
            headers = [(n, v) for n, v in headers if n != header.name]
    return headers


def _describe(rule: HttpRule) -> str:
    parts = [
        f"{name}={value!r}"
        for name, value in (("method", rule.method), ("path", rule.path), ("host", rule.host))
        if value
    ]
    parts += [f"header {h.name}" + (f"={h.value!r}" if h.value is not None else "") for h in rule.headers]
    return "{" + ", ".join(parts) + "}" if parts else "{} (every request)"
