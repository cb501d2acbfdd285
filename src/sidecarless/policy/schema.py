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
from dataclasses import dataclass

from sidecarless.policy.model import (
    CCNP,
    CNP,
    ENTITIES,
    CidrRule,
    LabelSelector,
    Peers,
    Policy,
    PortRule,
    Requirement,
    Rule,
    RuleItem,
    Secret,
    strip_label_source,
)
from sidecarless.policy.ports import port_rule
from sidecarless.policy.reader import NOT_YET, PolicyError, PolicyFileError, Reader, kind_of
from sidecarless.policy.yamlnodes import Node, YamlError, parse_documents

API_VERSION = "cilium.io/v2"
MAX_FILE_BYTES = 1024 * 1024
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_SPEC_FIELDS = {
    "endpointSelector", "ingress", "ingressDeny", "egress", "egressDeny", "enableDefaultDeny", "description",
}  # fmt: skip
_PEER_FIELDS = {
    "ingress": ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities"),
    "egress": ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities"),
}


@dataclass(frozen=True)
class PolicyDocuments:
    policies: tuple[Policy, ...] = ()
    secrets: tuple[Secret, ...] = ()


def parse_policy_file(file: str, text: str) -> PolicyDocuments:
    """Every policy and Secret in a YAML file; raises PolicyFileError with all errors if any is invalid."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise PolicyFileError([PolicyError(file, 1, "", f"file is larger than {MAX_FILE_BYTES} bytes")])
    try:
        documents = parse_documents(text)
    except YamlError as error:
        raise PolicyFileError([PolicyError(file, error.line, "", f"invalid YAML: {error.message}")]) from None
    reader = Reader(file)
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


def _secret(reader: Reader, document: Node) -> Secret | None:
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
            reader.error(top[section], section, f"must be a mapping, not {kind_of(entries)}")
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


AUDIT_ANNOTATION = "policy.sidecarless.io/audit"


def _policy(reader: Reader, document: Node) -> Policy | None:
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
    audit = _audit_annotation(reader, top.get("metadata"))
    rules: list[Rule] = []
    if "spec" in top and (rule := _rule(reader, top["spec"], "spec")) is not None:
        rules.append(rule)
    if "specs" in top:
        rules += reader.sequence(top["specs"], "specs", lambda n, p: _rule(reader, n, p))
    if "spec" not in top and "specs" not in top:
        reader.error(document, "spec", "required field is missing")
    if name is None or kind is None or (kind == CNP and namespace is None):
        return None
    return Policy(kind, name, namespace if kind == CNP else None, reader.file, document.line, tuple(rules), audit)


def _audit_annotation(reader: Reader, metadata: Node | None) -> bool:
    """`policy.sidecarless.io/audit: "true"`: the policy is audited, not enforced (the string values a
    Kubernetes annotation takes; anything else is an error rather than a silent enforce)."""
    if metadata is None or not isinstance(metadata.value, dict) or "annotations" not in metadata.value:
        return False
    annotations = metadata.value["annotations"]
    if not isinstance(annotations.value, dict):
        reader.error(annotations, "metadata.annotations", f"must be a mapping, not {kind_of(annotations.value)}")
        return False
    node = annotations.value.get(AUDIT_ANNOTATION)
    if node is None:
        return False
    path = f"metadata.annotations.{AUDIT_ANNOTATION}"
    if node.value not in ("true", "false"):
        reader.error(node, path, f'must be "true" or "false" (a string), not {node.value!r}')
        return False
    return bool(node.value == "true")


def _metadata(reader: Reader, node: Node | None, document: Node, namespaced: bool) -> tuple[str | None, str | None]:
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


def _rule(reader: Reader, node: Node, path: str) -> Rule | None:
    spec = reader.mapping(node, path, _SPEC_FIELDS, NOT_YET["spec"])
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


def _section(reader: Reader, node: Node, path: str, direction: str, deny: bool) -> tuple[RuleItem, ...]:
    return reader.sequence(node, path, lambda n, p: _item(reader, n, p, direction, deny))


def _selector(reader: Reader, node: Node, path: str) -> LabelSelector | None:
    if node.value is None:
        return LabelSelector()
    fields = reader.mapping(node, path, {"matchLabels", "matchExpressions"})
    labels: list[tuple[str, str]] = []
    valid = True
    if "matchLabels" in fields:
        match_labels = fields["matchLabels"].value
        if not isinstance(match_labels, dict):
            reader.error(
                fields["matchLabels"], f"{path}.matchLabels", f"must be a mapping, not {kind_of(match_labels)}"
            )
            return None
        for key, value in match_labels.items():
            if isinstance(value.value, str):
                labels.append((strip_label_source(key), value.value))
            else:
                reader.error(value, f"{path}.matchLabels.{key}", f"must be a string, not {kind_of(value.value)}")
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


def _requirement(reader: Reader, node: Node, path: str) -> Requirement | None:
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


def _item(reader: Reader, node: Node, path: str, direction: str, deny: bool) -> RuleItem | None:
    endpoints_field, cidr_field, cidr_set_field, entities_field = _PEER_FIELDS[direction]
    known = {endpoints_field, cidr_field, cidr_set_field, entities_field, "toPorts"}
    fields = reader.mapping(node, path, known, NOT_YET[direction])
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
        to_ports = reader.sequence(fields["toPorts"], f"{path}.toPorts", lambda n, p: port_rule(reader, n, p, deny))
    peers = Peers(endpoints, tuple(cidrs) if cidrs is not None else None, entities)
    return RuleItem(peers, to_ports)


_PLAIN_IPV4_PREFIX = re.compile(r"^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})"
                                r"(?:/(0|[1-9][0-9]?))?$")  # fmt: skip


def _cidr(reader: Reader, node: Node, path: str) -> str | None:
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
        reader.error(node, path, f"{text!r} is not a CIDR (such as 10.0.0.0/8 or fd00::/8)")
        return None
    return str(network)


def _cidr_rule(reader: Reader, node: Node, path: str) -> CidrRule | None:
    cidr = _cidr(reader, node, path)
    return CidrRule(cidr) if cidr is not None else None


def _cidr_set(reader: Reader, node: Node, path: str) -> CidrRule | None:
    fields = reader.mapping(node, path, {"cidr", "except"}, NOT_YET["cidrSet"])
    if "cidr" not in fields:
        reader.error(node, f"{path}.cidr", "required field is missing")
        return None
    cidr = _cidr(reader, fields["cidr"], f"{path}.cidr")
    excepts: tuple[str, ...] = ()
    if "except" in fields:
        excepts = reader.sequence(fields["except"], f"{path}.except", lambda n, p: _cidr(reader, n, p))
        if cidr is not None:
            outer = ipaddress.ip_network(cidr)
            for index, inner in enumerate(excepts):
                network = ipaddress.ip_network(inner)
                if network.version != outer.version or not network.subnet_of(outer):  # type: ignore[arg-type]
                    reader.error(
                        fields["except"].value[index],
                        f"{path}.except[{index}]",
                        f"{inner} is not inside {cidr}",
                    )
    return CidrRule(cidr, tuple(sorted(set(excepts)))) if cidr is not None else None


def _entity(reader: Reader, node: Node, path: str) -> str | None:
    value = reader.string(node, path)
    if value is not None and value not in ENTITIES:
        reader.error(node, path, f"unknown entity {value!r} (known: {', '.join(ENTITIES)})")
        return None
    return value


def parse_policy_bytes(label: str, raw: bytes) -> PolicyDocuments:
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyFileError([PolicyError(label, 1, "", f"file is {len(raw)} bytes, more than {MAX_FILE_BYTES}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PolicyFileError([PolicyError(label, line, "", "file is not UTF-8")]) from None
    return parse_policy_file(label, text)
