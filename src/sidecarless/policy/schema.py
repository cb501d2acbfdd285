"""The user-facing CiliumNetworkPolicy schema: typed, validated, with errors in the user's terms.

Pure. `parse_policy_file(name, text)` returns the policies in a file or raises `PolicyFileError` holding
every error found, each naming file, line and field path (`spec.ingress[1].toPorts[0].ports[0].port`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import re2

from sidecarless.policy.yamlnodes import Node, YamlError, parse_documents

API_VERSION = "cilium.io/v2"
KIND = "CiliumNetworkPolicy"
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
# Label sources Cilium prefixes keys with; a key means the same with or without them.
_LABEL_SOURCES = ("k8s:", "any:")
MAX_PORTS_PER_RULE = 40
MAX_FILE_BYTES = 1024 * 1024

# Fields Cilium defines that this version does not implement yet: named so the error says "not supported"
# rather than "unknown", and never silently ignored (ignoring an allow or deny changes verdicts).
_NOT_YET = {
    "spec": {"egress", "egressDeny", "ingressDeny", "enableDefaultDeny", "nodeSelector", "labels"},
    "ingress": {
        "fromCIDR",
        "fromCIDRSet",
        "fromEntities",
        "fromRequires",
        "fromGroups",
        "fromNodes",
        "icmps",
        "authentication",
    },
    "selector": {"matchExpressions"},
    "portRule": {"listener", "originatingTLS", "terminatingTLS", "serverNames"},
    "port": {"endPort"},
    "rules": {"kafka", "dns", "l7proto", "l7"},
    "http": {"host", "headers", "headerMatches"},
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
class LabelSelector:
    """matchLabels, keys without their `k8s:` source prefix, sorted."""

    match_labels: tuple[tuple[str, str], ...]

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.match_labels)


@dataclass(frozen=True)
class HttpRule:
    """All given fields must match (RE2 full match); None matches anything."""

    method: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class PortProtocol:
    port: int  # 0 = any port
    protocol: str  # TCP, UDP, ANY


@dataclass(frozen=True)
class PortRule:
    ports: tuple[PortProtocol, ...]
    http: tuple[HttpRule, ...] | None  # None: no L7 rules (an L4 allow)


@dataclass(frozen=True)
class IngressRule:
    from_endpoints: tuple[LabelSelector, ...] | None  # None: any peer
    to_ports: tuple[PortRule, ...]  # empty: every port (an L3 allow)


@dataclass(frozen=True)
class Policy:
    name: str
    namespace: str
    file: str
    line: int
    endpoint_selector: LabelSelector
    ingress: tuple[IngressRule, ...] | None  # None: the policy says nothing about ingress

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def strip_label_source(key: str) -> str:
    for prefix in _LABEL_SOURCES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


T = TypeVar("T")


@dataclass
class _Reader:
    """Walks one document, collecting every error rather than stopping at the first."""

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
                self.error_at(
                    node.key_line(key), _join(path, key), "not supported by this version of sidecarless"
                )
            elif key not in known:
                self.error_at(
                    node.key_line(key), _join(path, key), f"unknown field (known: {', '.join(sorted(known))})"
                )
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


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number"}.get(
        type(value), type(value).__name__
    )


def parse_policy_file(file: str, text: str) -> list[Policy]:
    """Every policy in a YAML file; raises PolicyFileError with all errors if any document is invalid."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise PolicyFileError([PolicyError(file, 1, "", f"file is larger than {MAX_FILE_BYTES} bytes")])
    try:
        documents = parse_documents(text)
    except YamlError as error:
        raise PolicyFileError([PolicyError(file, error.line, "", f"invalid YAML: {error.message}")]) from None
    reader = _Reader(file)
    policies = [policy for document in documents if (policy := _policy(reader, document)) is not None]
    if reader.errors:
        raise PolicyFileError(reader.errors)
    return policies


def _policy(reader: _Reader, document: Node) -> Policy | None:
    top = reader.mapping(document, "", {"apiVersion", "kind", "metadata", "spec"})
    for required in ("apiVersion", "kind", "metadata", "spec"):
        if required not in top:
            reader.error(document, required, "required field is missing")
    if "apiVersion" in top and top["apiVersion"].value != API_VERSION:
        reader.error(top["apiVersion"], "apiVersion", f"must be {API_VERSION}")
    if "kind" in top and top["kind"].value != KIND:
        reader.error(top["kind"], "kind", f"must be {KIND}")
    name, namespace = _metadata(reader, top["metadata"]) if "metadata" in top else (None, None)
    if "spec" not in top:
        return None
    spec = reader.mapping(
        top["spec"], "spec", {"endpointSelector", "ingress", "description"}, _NOT_YET["spec"]
    )
    if "endpointSelector" not in spec:
        reader.error(top["spec"], "spec.endpointSelector", "required field is missing")
        return None
    selector = _selector(reader, spec["endpointSelector"], "spec.endpointSelector")
    ingress = None
    if "ingress" in spec:
        ingress = reader.sequence(spec["ingress"], "spec.ingress", lambda n, p: _ingress_rule(reader, n, p))
    if "description" in spec:
        reader.string(spec["description"], "spec.description")
    if name is None or namespace is None or selector is None:
        return None
    return Policy(name, namespace, reader.file, document.line, selector, ingress)


def _metadata(reader: _Reader, node: Node) -> tuple[str | None, str | None]:
    metadata = reader.mapping(node, "metadata", {"name", "namespace", "labels", "annotations", "uid"})
    name = reader.string(metadata["name"], "metadata.name") if "name" in metadata else None
    if "name" not in metadata:
        reader.error(node, "metadata.name", "required field is missing")
    namespace = (
        reader.string(metadata["namespace"], "metadata.namespace") if "namespace" in metadata else "default"
    )
    return name, namespace


def _selector(reader: _Reader, node: Node, path: str) -> LabelSelector | None:
    fields = reader.mapping(node, path, {"matchLabels"}, _NOT_YET["selector"])
    labels: list[tuple[str, str]] = []
    if "matchLabels" in fields:
        match_labels = fields["matchLabels"].value
        if not isinstance(match_labels, dict):
            reader.error(
                fields["matchLabels"], f"{path}.matchLabels", f"must be a mapping, not {_kind(match_labels)}"
            )
            return None
        for key, value in match_labels.items():
            if isinstance(value.value, str):
                labels.append((strip_label_source(key), value.value))
            else:
                reader.error(
                    value, f"{path}.matchLabels.{key}", f"must be a string, not {_kind(value.value)}"
                )
    return LabelSelector(tuple(sorted(labels)))


def _ingress_rule(reader: _Reader, node: Node, path: str) -> IngressRule | None:
    fields = reader.mapping(node, path, {"fromEndpoints", "toPorts"}, _NOT_YET["ingress"])
    peers = None
    if "fromEndpoints" in fields:
        peers = reader.sequence(
            fields["fromEndpoints"], f"{path}.fromEndpoints", lambda n, p: _selector(reader, n, p)
        )
    to_ports: tuple[PortRule, ...] = ()
    if "toPorts" in fields:
        to_ports = reader.sequence(
            fields["toPorts"], f"{path}.toPorts", lambda n, p: _port_rule(reader, n, p)
        )
    return IngressRule(peers, to_ports)


def _port_rule(reader: _Reader, node: Node, path: str) -> PortRule | None:
    fields = reader.mapping(node, path, {"ports", "rules"}, _NOT_YET["portRule"])
    ports: tuple[PortProtocol, ...] = ()
    if "ports" in fields:
        ports = reader.sequence(fields["ports"], f"{path}.ports", lambda n, p: _port(reader, n, p))
        if len(ports) > MAX_PORTS_PER_RULE:
            reader.error(fields["ports"], f"{path}.ports", f"at most {MAX_PORTS_PER_RULE} ports per rule")
    http = None
    if "rules" in fields:
        rules = reader.mapping(fields["rules"], f"{path}.rules", {"http"}, _NOT_YET["rules"])
        if "http" in rules:
            http = reader.sequence(rules["http"], f"{path}.rules.http", lambda n, p: _http_rule(reader, n, p))
            for index, port in enumerate(ports):
                if port.protocol != "TCP" or port.port == 0:
                    reader.error(
                        fields["ports"].value[index],
                        f"{path}.ports[{index}]",
                        "HTTP rules need an explicit protocol: TCP and a non-zero port",
                    )
    return PortRule(ports, http)


def _port(reader: _Reader, node: Node, path: str) -> PortProtocol | None:
    fields = reader.mapping(node, path, {"port", "protocol"}, _NOT_YET["port"])
    number = 0
    if "port" in fields:
        raw = fields["port"].value
        text = str(raw) if isinstance(raw, int | str) and not isinstance(raw, bool) else None
        if text is None or not text.isdigit():
            reader.error(fields["port"], f"{path}.port", f"must be a port number, not {raw!r}")
            return None
        number = int(text)
        if not 0 <= number <= 65535:
            reader.error(fields["port"], f"{path}.port", f"{number} is not a port number (0-65535)")
            return None
    protocol = "ANY"
    if "protocol" in fields:
        value = reader.string(fields["protocol"], f"{path}.protocol")
        if value not in ("TCP", "UDP", "ANY"):
            if value is not None:
                reader.error(
                    fields["protocol"], f"{path}.protocol", f"must be TCP, UDP or ANY, not {value!r}"
                )
            return None
        protocol = value
    return PortProtocol(number, protocol)


def _http_rule(reader: _Reader, node: Node, path: str) -> HttpRule | None:
    fields = reader.mapping(node, path, {"method", "path"}, _NOT_YET["http"])
    values: dict[str, str | None] = {"method": None, "path": None}
    for name in values:
        if name in fields:
            pattern = reader.string(fields[name], f"{path}.{name}")
            if pattern is not None and (problem := regex_problem(pattern)) is not None:
                reader.error(
                    fields[name], f"{path}.{name}", f"invalid regular expression {pattern!r}: {problem}"
                )
                pattern = None
            values[name] = pattern or None
    return HttpRule(method=values["method"], path=values["path"])


def regex_problem(pattern: str) -> str | None:
    """Why RE2 (Envoy's engine) rejects a pattern, or None. Python's `re` accepts patterns RE2 does not."""
    try:
        re2.compile(pattern)
    except re2.error as error:
        return str(error)
    return None
