"""The user-facing CiliumNetworkPolicy schema: validation with errors in the user's terms. Pure.

`parse_policy_file(name, text)` returns the policies and Secrets in a file, or raises `PolicyFileError`
holding every error found, each naming file, line and field path (`spec.ingress[1].toPorts[0].ports[0].port`).
Unknown fields are errors: a typo in `toPorts` must not silently allow or deny. Fields Cilium defines that
sidecarless does not implement are errors too ("not supported"), never ignored.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import re2

from sidecarless.policy.model import (
    CCNP,
    CNP,
    ENTITIES,
    MISMATCH_ACTIONS,
    CidrRule,
    HeaderMatch,
    HeaderValue,
    HttpRule,
    LabelSelector,
    Peers,
    Policy,
    PortProtocol,
    PortRule,
    Requirement,
    Rule,
    RuleItem,
    Secret,
    SecretRef,
    strip_label_source,
)
from sidecarless.policy.yamlnodes import Node, YamlError, parse_documents

API_VERSION = "cilium.io/v2"
MAX_PORTS_PER_RULE = 40
MAX_FILE_BYTES = 1024 * 1024
# A header value a rule matches exactly: every copy of the header must have it, which render checks with a
# generated pattern whose size grows with the value (xds/render.py GENERATED_REGEX_PROGRAM_SIZE).
MAX_HEADER_VALUE = 1024
# Envoy rejects regular expressions whose RE2 program is larger (runtime re2.max_program_size.error_level).
ENVOY_MAX_REGEX_PROGRAM_SIZE = 100
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^:?[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_SPEC_FIELDS = {
    "endpointSelector", "ingress", "ingressDeny", "egress", "egressDeny", "enableDefaultDeny", "description",
}  # fmt: skip
_NOT_YET = {
    "spec": {"nodeSelector", "labels", "log"},
    "ingress": {"fromRequires", "fromGroups", "fromNodes", "icmps", "authentication"},
    "egress": {"toRequires", "toGroups", "toNodes", "toFQDNs", "toServices", "icmps", "authentication"},
    "cidrSet": {"cidrGroupRef", "cidrGroupSelector"},
    "portRule": {"listener", "originatingTLS", "terminatingTLS", "serverNames"},
    "rules": {"kafka", "dns", "l7proto", "l7"},
}
_PEER_FIELDS = {
    "ingress": ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities"),
    "egress": ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities"),
}


@dataclass(frozen=True)
class PolicyError:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class PolicyFileError(Exception):
    """A file that cannot be accepted. Retrying does not help until the file changes."""

    def __init__(self, errors: list[PolicyError]) -> None:
        super().__init__("\n".join(str(error) for error in errors))
        self.errors = errors


@dataclass(frozen=True)
class PolicyDocuments:
    policies: tuple[Policy, ...] = ()
    secrets: tuple[Secret, ...] = ()


T = TypeVar("T")


@dataclass
class _Reader:
    """Walks one file, collecting every error rather than stopping at the first."""

    file: str
    errors: list[PolicyError] = field(default_factory=list)

    def error(self, node: Node, path: str, message: str) -> None:
        self.error_at(node.line, path, message)

    def error_at(self, line: int, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.file, line, path, message))

    def mapping(
        self, node: Node, path: str, known: set[str], not_yet: frozenset[str] | set[str] = frozenset()
    ) -> dict[str, Node]:
        if not isinstance(node.value, dict):
            self.error(node, path, f"must be a mapping, not {_kind(node.value)}")
            return {}
        fields: dict[str, Node] = node.value
        for key in fields:
            if key in not_yet:
                self.error_at(node.key_line(key), _join(path, key), "not supported by this version of sidecarless")
            elif key not in known:
                known_list = ", ".join(sorted(known))
                self.error_at(node.key_line(key), _join(path, key), f"unknown field (known: {known_list})")
        return {key: value for key, value in fields.items() if key in known}

    def sequence(self, node: Node, path: str, item: Callable[[Node, str], T | None]) -> tuple[T, ...]:
        if not isinstance(node.value, list):
            self.error(node, path, f"must be a list, not {_kind(node.value)}")
            return ()
        results = [item(element, f"{path}[{index}]") for index, element in enumerate(node.value)]
        return tuple(result for result in results if result is not None)

    def string(self, node: Node, path: str) -> str | None:
        if not isinstance(node.value, str):
            self.error(node, path, f"must be a string, not {_kind(node.value)}")
            return None
        return node.value

    def strings(self, node: Node, path: str) -> tuple[str, ...]:
        return self.sequence(node, path, self.string)

    def boolean(self, node: Node, path: str) -> bool | None:
        if not isinstance(node.value, bool):
            self.error(node, path, f"must be true or false, not {_kind(node.value)}")
            return None
        return node.value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if value is None:
        return "null"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number"}
    return names.get(type(value), type(value).__name__)


def parse_policy_file(file: str, text: str) -> PolicyDocuments:
    """Every policy and Secret in a YAML file; raises PolicyFileError with all errors if any is invalid."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise PolicyFileError([PolicyError(file, 1, "", f"file is larger than {MAX_FILE_BYTES} bytes")])
    try:
        documents = parse_documents(text)
    except YamlError as error:
        raise PolicyFileError([PolicyError(file, error.line, "", f"invalid YAML: {error.message}")]) from None
    reader = _Reader(file)
    policies: list[Policy] = []
    secrets: list[Secret] = []
    for document in documents:
        fields = document.value if isinstance(document.value, dict) else {}
        if fields.get("kind", Node(None, 0)).value == "Secret":
            secret = _secret(reader, document)
            if secret is not None:
                secrets.append(secret)
        elif (policy := _policy(reader, document)) is not None:
            policies.append(policy)
    if reader.errors:
        raise PolicyFileError(reader.errors)
    return PolicyDocuments(tuple(policies), tuple(secrets))


def _secret(reader: _Reader, document: Node) -> Secret | None:
    top = reader.mapping(document, "", {"apiVersion", "kind", "metadata", "data", "stringData", "type"})
    if "apiVersion" in top and top["apiVersion"].value != "v1":
        reader.error(top["apiVersion"], "apiVersion", "a Secret's apiVersion must be v1")
    name, namespace = _metadata(reader, top.get("metadata"), document, namespaced=True)
    data: dict[str, str] = {}
    for section in ("data", "stringData"):
        if section not in top:
            continue
        entries = top[section].value
        if not isinstance(entries, dict):
            reader.error(top[section], section, f"must be a mapping, not {_kind(entries)}")
            continue
        for key, value in entries.items():
            text = reader.string(value, f"{section}.{key}")
            if text is None:
                continue
            if section == "stringData":
                data[key] = text
                continue
            try:
                data[key] = base64.b64decode(text, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                reader.error(value, f"{section}.{key}", "must be base64 of UTF-8 text")
    if name is None or namespace is None:
        return None
    return Secret(namespace, name, tuple(sorted(data.items())), reader.file, document.line)


def _policy(reader: _Reader, document: Node) -> Policy | None:
    top = reader.mapping(document, "", {"apiVersion", "kind", "metadata", "spec", "specs", "status"})
    for required in ("apiVersion", "kind", "metadata"):
        if required not in top:
            reader.error(document, required, "required field is missing")
    if "apiVersion" in top and top["apiVersion"].value != API_VERSION:
        reader.error(top["apiVersion"], "apiVersion", f"must be {API_VERSION}")
    kind = top["kind"].value if "kind" in top else None
    if "kind" in top and kind not in (CNP, CCNP):
        reader.error(top["kind"], "kind", f"must be {CNP}, {CCNP} or Secret")
        return None
    name, namespace = _metadata(reader, top.get("metadata"), document, namespaced=kind == CNP)
    rules: list[Rule] = []
    if "spec" in top and (rule := _rule(reader, top["spec"], "spec")) is not None:
        rules.append(rule)
    if "specs" in top:
        rules += reader.sequence(top["specs"], "specs", lambda n, p: _rule(reader, n, p))
    if "spec" not in top and "specs" not in top:
        reader.error(document, "spec", "required field is missing")
    if name is None or kind is None or (kind == CNP and namespace is None):
        return None
    return Policy(kind, name, namespace if kind == CNP else None, reader.file, document.line, tuple(rules))


def _metadata(reader: _Reader, node: Node | None, document: Node, namespaced: bool) -> tuple[str | None, str | None]:
    if node is None:
        return None, None
    metadata = reader.mapping(
        node,
        "metadata",
        {"name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation"},
    )
    if "name" not in metadata:
        reader.error(node, "metadata.name", "required field is missing")
    name = reader.string(metadata["name"], "metadata.name") if "name" in metadata else None
    namespace: str | None = None
    if namespaced:
        namespace = "default"
        if "namespace" in metadata:
            namespace = reader.string(metadata["namespace"], "metadata.namespace")
    elif "namespace" in metadata:
        reader.error(metadata["namespace"], "metadata.namespace", f"a {CCNP} has no namespace")
    return name, namespace


def _rule(reader: _Reader, node: Node, path: str) -> Rule | None:
    spec = reader.mapping(node, path, _SPEC_FIELDS, _NOT_YET["spec"])
    if "endpointSelector" not in spec:
        if spec or isinstance(node.value, dict):
            reader.error(node, f"{path}.endpointSelector", "required field is missing")
        return None
    selector = _selector(reader, spec["endpointSelector"], f"{path}.endpointSelector")
    sections: dict[str, tuple[RuleItem, ...] | None] = {}
    for section, direction, deny in (
        ("ingress", "ingress", False),
        ("ingressDeny", "ingress", True),
        ("egress", "egress", False),
        ("egressDeny", "egress", True),
    ):
        sections[section] = None
        if section in spec:
            sections[section] = _section(reader, spec[section], f"{path}.{section}", direction, deny)
    default_deny = {"ingress": True, "egress": True}
    if "enableDefaultDeny" in spec:
        flags = reader.mapping(spec["enableDefaultDeny"], f"{path}.enableDefaultDeny", {"ingress", "egress"})
        for direction, flag_node in flags.items():
            value = reader.boolean(flag_node, f"{path}.enableDefaultDeny.{direction}")
            if value is not None:
                default_deny[direction] = value
    if "description" in spec:
        reader.string(spec["description"], f"{path}.description")
    if selector is None:
        return None
    return Rule(
        selector,
        ingress=sections["ingress"],
        ingress_deny=sections["ingressDeny"],
        egress=sections["egress"],
        egress_deny=sections["egressDeny"],
        default_deny_ingress=default_deny["ingress"],
        default_deny_egress=default_deny["egress"],
    )


def _section(reader: _Reader, node: Node, path: str, direction: str, deny: bool) -> tuple[RuleItem, ...]:
    return reader.sequence(node, path, lambda n, p: _item(reader, n, p, direction, deny))


def _selector(reader: _Reader, node: Node, path: str) -> LabelSelector | None:
    if node.value is None:
        return LabelSelector()
    fields = reader.mapping(node, path, {"matchLabels", "matchExpressions"})
    labels: list[tuple[str, str]] = []
    valid = True
    if "matchLabels" in fields:
        match_labels = fields["matchLabels"].value
        if not isinstance(match_labels, dict):
            reader.error(fields["matchLabels"], f"{path}.matchLabels", f"must be a mapping, not {_kind(match_labels)}")
            return None
        for key, value in match_labels.items():
            if isinstance(value.value, str):
                labels.append((strip_label_source(key), value.value))
            else:
                reader.error(value, f"{path}.matchLabels.{key}", f"must be a string, not {_kind(value.value)}")
                valid = False
    expressions: tuple[Requirement, ...] = ()
    if "matchExpressions" in fields:
        expressions = reader.sequence(
            fields["matchExpressions"], f"{path}.matchExpressions", lambda n, p: _requirement(reader, n, p)
        )
        valid = valid and len(expressions) == len(fields["matchExpressions"].value or [])
    if not valid:
        return None
    return LabelSelector(tuple(sorted(labels)), tuple(expressions))


def _requirement(reader: _Reader, node: Node, path: str) -> Requirement | None:
    fields = reader.mapping(node, path, {"key", "operator", "values"})
    key = reader.string(fields["key"], f"{path}.key") if "key" in fields else None
    operator = reader.string(fields["operator"], f"{path}.operator") if "operator" in fields else None
    for required in ("key", "operator"):
        if required not in fields:
            reader.error(node, f"{path}.{required}", "required field is missing")
    values = reader.strings(fields["values"], f"{path}.values") if "values" in fields else ()
    if operator is not None and operator not in _OPERATORS:
        reader.error(fields["operator"], f"{path}.operator", f"must be one of {', '.join(_OPERATORS)}")
        return None
    if operator in ("In", "NotIn") and not values:
        reader.error(node, f"{path}.values", f"{operator} needs at least one value")
        return None
    if operator in ("Exists", "DoesNotExist") and values:
        reader.error(fields["values"], f"{path}.values", f"{operator} takes no values")
        return None
    if key is None or operator is None:
        return None
    return Requirement(strip_label_source(key), operator, tuple(sorted(set(values))))


def _item(reader: _Reader, node: Node, path: str, direction: str, deny: bool) -> RuleItem | None:
    endpoints_field, cidr_field, cidr_set_field, entities_field = _PEER_FIELDS[direction]
    known = {endpoints_field, cidr_field, cidr_set_field, entities_field, "toPorts"}
    fields = reader.mapping(node, path, known, _NOT_YET[direction])
    endpoints = None
    if endpoints_field in fields:
        endpoints = reader.sequence(
            fields[endpoints_field], f"{path}.{endpoints_field}", lambda n, p: _selector(reader, n, p)
        )
    cidrs: list[CidrRule] | None = None
    if cidr_field in fields:
        cidrs = list(reader.sequence(fields[cidr_field], f"{path}.{cidr_field}", lambda n, p: _cidr_rule(reader, n, p)))
    if cidr_set_field in fields:
        cidr_set = reader.sequence(
            fields[cidr_set_field], f"{path}.{cidr_set_field}", lambda n, p: _cidr_set(reader, n, p)
        )
        cidrs = [*(cidrs or []), *cidr_set]
    entities = None
    if entities_field in fields:
        entities = reader.sequence(
            fields[entities_field], f"{path}.{entities_field}", lambda n, p: _entity(reader, n, p)
        )
    to_ports: tuple[PortRule, ...] = ()
    if "toPorts" in fields:
        to_ports = reader.sequence(fields["toPorts"], f"{path}.toPorts", lambda n, p: _port_rule(reader, n, p, deny))
    peers = Peers(endpoints, tuple(cidrs) if cidrs is not None else None, entities)
    return RuleItem(peers, to_ports)


_PLAIN_IPV4_PREFIX = re.compile(r"^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})"
                                r"(?:/(0|[1-9][0-9]?))?$")  # fmt: skip


def _cidr(reader: _Reader, node: Node, path: str) -> str | None:
    text = reader.string(node, path)
    if text is None:
        return None
    plain = _PLAIN_IPV4_PREFIX.match(text)
    if plain is not None:
        # The common case read by hand (8,000 prefixes through ipaddress cost a quarter of a second); the
        # same result as ip_network(text, strict=False), which answers for everything else.
        octets = [int(octet) for octet in plain.groups()[:4]]
        length = int(plain.group(5)) if plain.group(5) is not None else 32
        if all(octet <= 255 for octet in octets) and length <= 32:
            value = int.from_bytes(bytes(octets), "big") >> (32 - length) << (32 - length)
            return f"{'.'.join(str(byte) for byte in value.to_bytes(4, 'big'))}/{length}"
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        reader.error(node, path, f"{text!r} is not a CIDR (such as 10.0.0.0/8)")
        return None
    if network.version != 4:
        reader.error(node, path, "IPv6 is not supported by this version of sidecarless")
        return None
    return str(network)


def _cidr_rule(reader: _Reader, node: Node, path: str) -> CidrRule | None:
    cidr = _cidr(reader, node, path)
    return CidrRule(cidr) if cidr is not None else None


def _cidr_set(reader: _Reader, node: Node, path: str) -> CidrRule | None:
    fields = reader.mapping(node, path, {"cidr", "except"}, _NOT_YET["cidrSet"])
    if "cidr" not in fields:
        reader.error(node, f"{path}.cidr", "required field is missing")
        return None
    cidr = _cidr(reader, fields["cidr"], f"{path}.cidr")
    excepts: tuple[str, ...] = ()
    if "except" in fields:
        excepts = reader.sequence(fields["except"], f"{path}.except", lambda n, p: _cidr(reader, n, p))
        if cidr is not None:
            outer = ipaddress.IPv4Network(cidr)
            for index, inner in enumerate(excepts):
                if not ipaddress.IPv4Network(inner).subnet_of(outer):
                    reader.error(
                        fields["except"].value[index],
                        f"{path}.except[{index}]",
                        f"{inner} is not inside {cidr}",
                    )
    return CidrRule(cidr, tuple(sorted(set(excepts)))) if cidr is not None else None


def _entity(reader: _Reader, node: Node, path: str) -> str | None:
    value = reader.string(node, path)
    if value is not None and value not in ENTITIES:
        reader.error(node, path, f"unknown entity {value!r} (known: {', '.join(ENTITIES)})")
        return None
    return value


def _port_rule(reader: _Reader, node: Node, path: str, deny: bool) -> PortRule | None:
    fields = reader.mapping(node, path, {"ports", "rules"}, _NOT_YET["portRule"])
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
        rules = reader.mapping(fields["rules"], f"{path}.rules", {"http"}, _NOT_YET["rules"])
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


def _port(reader: _Reader, node: Node, path: str) -> PortProtocol | None:
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


def _http_rule(reader: _Reader, node: Node, path: str) -> HttpRule | None:
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


def _header(reader: _Reader, node: Node, path: str) -> HeaderValue | None:
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


def _header_match(reader: _Reader, node: Node, path: str) -> HeaderMatch | None:
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
