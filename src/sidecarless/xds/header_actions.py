"""headerMatches mismatch actions (ADD, DELETE, REPLACE) in Envoy. Pure.

RBAC decides whether a request passes; it cannot change the request. Each route's rule filters (render.py)
name the HTTP rule that matched in dynamic metadata; a static Lua filter (header_actions.lua) then applies
that rule's actions, which the route's metadata lists. Policy stays in RDS: a change reaches open
connections on their next request.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources

from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, struct_pb2

from sidecarless.policy.model import HeaderValue, HttpRule

ACTIONS = ("ADD", "DELETE", "REPLACE")  # LOG changes nothing in the request
FILTER_NAME = "sidecarless.header_actions"
LUA_CODE = resources.files("sidecarless.xds").joinpath("header_actions.lua").read_text()


def actions_of(rule: HttpRule) -> tuple[HeaderValue, ...]:
    return tuple(h for h in rule.headers if h.mismatch in ACTIONS and h.value is not None)


def route_metadata(rules: Mapping[str, HttpRule]) -> struct_pb2.Struct | None:
    """{"actions": {shadow rule name: [[action, header, value], ...]}} for the rules with actions."""
    actions = {
        name: [[h.mismatch or "", h.name, h.value or ""] for h in actions_of(rule)]
        for name, rule in rules.items()
        if actions_of(rule)
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
