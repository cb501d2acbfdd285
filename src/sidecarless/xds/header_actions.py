"""headerMatches mismatch actions (ADD, DELETE, REPLACE) in Envoy. Pure.

RBAC decides whether a request passes; it cannot change the request. So each route that has actions
also carries RBAC shadow rules, one policy per HTTP rule, named in the order `policy trace` tries rules
(entries for a specific peer before the any-peer entries, rules in order): RBAC records the first that
matches in dynamic metadata. A static Lua filter (header_actions.lua) then applies that rule's actions,
which the route's metadata lists. Policy stays in RDS: a change reaches open connections on their next
request.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, struct_pb2

from sidecarless.policy.identity import ANY_IDENTITY, AddressSet
from sidecarless.policy.model import HeaderValue, HttpRule
from sidecarless.policy.plan import PolicyEntry

ACTIONS = ("ADD", "DELETE", "REPLACE")  # LOG changes nothing in the request
FILTER_NAME = "sidecarless.header_actions"
LUA_CODE = resources.files("sidecarless.xds").joinpath("header_actions.lua").read_text()


@dataclass(frozen=True)
class Scope:
    """Where an entry's rules apply: the peer's source addresses (ingress) or the destination (egress)."""

    entry: PolicyEntry
    source: AddressSet | None = None
    destination: AddressSet | None = None


@dataclass(frozen=True)
class ShadowRule:
    name: str  # ordered: RBAC tries policies in name order
    scope: Scope
    rule: HttpRule


def actions_of(rule: HttpRule) -> tuple[HeaderValue, ...]:
    return tuple(h for h in rule.headers if h.mismatch in ACTIONS and h.value is not None)


def has_actions(scopes: list[Scope]) -> bool:
    return any(actions_of(rule) for scope in scopes for rule in scope.entry.http)


def shadow_rules(group: str, scopes: list[Scope]) -> list[ShadowRule]:
    """Every HTTP rule of the scopes, named in trial order, when any of them has actions; else none."""
    if not has_actions(scopes):
        return []
    ordered = sorted(scopes, key=lambda scope: scope.entry.peer_identity == ANY_IDENTITY)
    rules = [(scope, rule) for scope in ordered for rule in scope.entry.http]
    return [ShadowRule(f"{group}-{index:05d}", scope, rule) for index, (scope, rule) in enumerate(rules)]


def route_metadata(shadows: list[ShadowRule]) -> struct_pb2.Struct | None:
    """{"actions": {shadow rule name: [[action, header, value], ...]}} for the rules with actions."""
    actions = {
        shadow.name: [[h.mismatch or "", h.name, h.value or ""] for h in actions_of(shadow.rule)]
        for shadow in shadows
        if actions_of(shadow.rule)
    }
    if not actions:
        return None
    metadata = struct_pb2.Struct()
    metadata.update({"actions": actions})
    return metadata


def listener_filter() -> hcm_pb2.HttpFilter:
    packed = any_pb2.Any()
    packed.Pack(lua_pb2.Lua(default_source_code={"inline_string": LUA_CODE}))
    return hcm_pb2.HttpFilter(name=FILTER_NAME, typed_config=packed)
