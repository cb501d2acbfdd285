"""The schema of `toPorts`: ports (numbers, names, ranges) and their L7 rules (HTTP method, path, host,
headers), validated as Envoy will take them."""

from __future__ import annotations

import re

import re2

from sidecarless.policy.model import (
    MISMATCH_ACTIONS,
    HeaderMatch,
    HeaderValue,
    HttpRule,
    PortProtocol,
    PortRule,
    SecretRef,
)
from sidecarless.policy.reader import NOT_YET, Reader
from sidecarless.policy.yamlnodes import Node

MAX_PORTS_PER_RULE = 40
# A header value a rule matches exactly: every copy of the header must have it, which render checks with a
# generated pattern whose size grows with the value (xds/render.py GENERATED_REGEX_PROGRAM_SIZE).
MAX_HEADER_VALUE = 1024
# Envoy rejects regular expressions whose RE2 program is larger (runtime re2.max_program_size.error_level).
ENVOY_MAX_REGEX_PROGRAM_SIZE = 100
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^:?[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def port_rule(reader: Reader, node: Node, path: str, deny: bool) -> PortRule | None:
    fields = reader.mapping(node, path, {"ports", "rules"}, NOT_YET["portRule"])
    ports: tuple[PortProtocol, ...] = ()
    if "ports" in fields:
        ports = reader.sequence(fields["ports"], f"{path}.ports", lambda n, p: _port(reader, n, p))
        if isinstance(fields["ports"].value, list) and len(fields["ports"].value) > MAX_PORTS_PER_RULE:
            reader.error(fields["ports"], f"{path}.ports", f"at most {MAX_PORTS_PER_RULE} ports per rule")
    http = None
    if "rules" in fields:
        if deny:
            reader.error(fields["rules"], f"{path}.rules", "deny rules are L3/L4 only: L7 rules are not allowed")
            return None
        rules = reader.mapping(fields["rules"], f"{path}.rules", {"http"}, NOT_YET["rules"])
        if "http" in rules:
            http = reader.sequence(rules["http"], f"{path}.rules.http", lambda n, p: _http_rule(reader, n, p))
            if "ports" not in fields:
                reader.error(fields["rules"], f"{path}.rules", "HTTP rules need ports with protocol: TCP")
            port_nodes = fields["ports"].value if "ports" in fields and isinstance(fields["ports"].value, list) else []
            for index, port in enumerate(ports):
                if port.protocol != "TCP" or port.all_ports:
                    reader.error(
                        port_nodes[index] if index < len(port_nodes) else fields["rules"],
                        f"{path}.ports[{index}]",
                        "HTTP rules need an explicit protocol: TCP and a non-zero port",
                    )
    return PortRule(ports, http)


def _port(reader: Reader, node: Node, path: str) -> PortProtocol | None:
    fields = reader.mapping(node, path, {"port", "endPort", "protocol"})
    protocol = "ANY"
    if "protocol" in fields:
        value = reader.string(fields["protocol"], f"{path}.protocol")
        if value not in ("TCP", "UDP", "SCTP", "ANY"):
            if value is not None:
                reader.error(fields["protocol"], f"{path}.protocol", f"must be TCP, UDP, SCTP or ANY, not {value!r}")
            return None
        protocol = value
    number, name = 0, None
    if "port" in fields:
        raw = fields["port"].value
        text = str(raw) if isinstance(raw, int | str) and not isinstance(raw, bool) else None
        if text is not None and text.isdigit():
            number = int(text)
            if not 0 <= number <= 65535:
                reader.error(fields["port"], f"{path}.port", f"{number} is not a port number (0-65535)")
                return None
        elif text is not None and _PORT_NAME.match(text):
            name = text
        else:
            reader.error(fields["port"], f"{path}.port", f"must be a port number or a port name, not {raw!r}")
            return None
    end = number if number else 65535
    if "endPort" in fields:
        raw_end = fields["endPort"].value
        if not isinstance(raw_end, int) or isinstance(raw_end, bool) or not 0 <= raw_end <= 65535:
            reader.error(fields["endPort"], f"{path}.endPort", f"must be a port number, not {raw_end!r}")
            return None
        if name is not None or number == 0:
            reader.error(fields["endPort"], f"{path}.endPort", "needs a numeric, non-zero port")
            return None
        if raw_end < number:
            reader.error(fields["endPort"], f"{path}.endPort", f"{raw_end} is lower than port {number}")
            return None
        end = raw_end if raw_end else number
    return PortProtocol(number, end, protocol, name)


def _http_rule(reader: Reader, node: Node, path: str) -> HttpRule | None:
    if node.value is None:
        return HttpRule()
    fields = reader.mapping(node, path, {"method", "path", "host", "headers", "headerMatches"})
    values: dict[str, str | None] = {"method": None, "path": None, "host": None}
    for name in values:
        if name in fields:
            pattern = reader.string(fields[name], f"{path}.{name}")
            if pattern is not None and (problem := regex_problem(pattern)) is not None:
                reader.error(fields[name], f"{path}.{name}", f'invalid regular expression "{pattern}": {problem}')
                pattern = None
            values[name] = pattern or None
    headers: tuple[HeaderValue, ...] = ()
    if "headers" in fields:
        headers = reader.sequence(fields["headers"], f"{path}.headers", lambda n, p: _header(reader, n, p))
    matches: tuple[HeaderMatch, ...] = ()
    if "headerMatches" in fields:
        matches = reader.sequence(
            fields["headerMatches"], f"{path}.headerMatches", lambda n, p: _header_match(reader, n, p)
        )
    return HttpRule(values["method"], values["path"], values["host"], headers, matches)


def _header(reader: Reader, node: Node, path: str) -> HeaderValue | None:
    text = reader.string(node, path)
    if text is None:
        return None
    name, separator, value = text.partition(":")
    if name == "" and separator:  # a pseudo-header such as ":authority: x"
        pseudo, separator, value = value.partition(":")
        name = ":" + pseudo
    name = name.strip()
    if not _HEADER_NAME.match(name):
        reader.error(node, path, f"{name!r} is not a header name")
        return None
    if len(value.strip()) > MAX_HEADER_VALUE:
        reader.error(node, path, f"header value longer than {MAX_HEADER_VALUE} characters")
        return None
    return HeaderValue(name.lower(), value.strip() if separator else None)


def _header_match(reader: Reader, node: Node, path: str) -> HeaderMatch | None:
    fields = reader.mapping(node, path, {"name", "value", "secret", "mismatch"})
    if "name" not in fields:
        reader.error(node, f"{path}.name", "required field is missing")
        return None
    name = reader.string(fields["name"], f"{path}.name")
    if name is not None and not _HEADER_NAME.match(name):
        reader.error(fields["name"], f"{path}.name", f"{name!r} is not a header name")
        name = None
    value = reader.string(fields["value"], f"{path}.value") if "value" in fields else None
    if value is not None and len(value) > MAX_HEADER_VALUE:
        reader.error(fields["value"], f"{path}.value", f"longer than {MAX_HEADER_VALUE} characters")
        value = None
    secret = None
    if "secret" in fields:
        secret_fields = reader.mapping(fields["secret"], f"{path}.secret", {"namespace", "name"})
        namespace = (
            reader.string(secret_fields["namespace"], f"{path}.secret.namespace")
            if "namespace" in secret_fields
            else None
        )
        secret_name = reader.string(secret_fields["name"], f"{path}.secret.name") if "name" in secret_fields else None
        if namespace is None or secret_name is None:
            reader.error(fields["secret"], f"{path}.secret", "needs namespace and name")
        else:
            secret = SecretRef(namespace, secret_name)
    if value is not None and secret is not None:
        reader.error(node, path, "value and secret are exclusive")
    mismatch = None
    if "mismatch" in fields:
        mismatch = reader.string(fields["mismatch"], f"{path}.mismatch")
        if mismatch is not None and mismatch not in MISMATCH_ACTIONS:
            reader.error(fields["mismatch"], f"{path}.mismatch", f"must be one of {', '.join(MISMATCH_ACTIONS)}")
            mismatch = None
    if name is None:
        return None
    return HeaderMatch(name.lower(), value, secret, mismatch)


def regex_problem(pattern: str) -> str | None:
    """Why Envoy would reject a pattern, or None: RE2 syntax (Python's `re` accepts patterns RE2 does not,
    such as backreferences) and the size of the compiled program, which Envoy caps."""
    try:
        size = re2.compile(pattern).programsize
    except re2.error as error:
        message = error.args[0] if error.args else error
        return message.decode() if isinstance(message, bytes) else str(message)
    if size > ENVOY_MAX_REGEX_PROGRAM_SIZE:
        return f"too complex for Envoy: RE2 program size {size} > {ENVOY_MAX_REGEX_PROGRAM_SIZE}"
    return None
