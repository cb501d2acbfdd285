"""The lab's pod file. Pure.

    ipFamily:  ipv4 | ipv6 | dual             # the pods' addresses (default dual)
    pods:      [{name, namespace, labels: {...}, serviceAccount, node, serve: [{port, protocol, name}]}]
    external:  [{name, ip, node, serve: [...]}]  # hosts outside the cluster ("world"), reached through a node

`protocol` is http (HTTP/1.1 and h2c), tcp (echo) or udp (echo); `name` makes the port a named port. `node`
names the node a pod runs on (or an external host is reached through): the nodes are the names given, in the
order they first appear; without one, the first node. No pod naming a node: one node.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from sidecarless.policy.model import Endpoint, NamedPort
from sidecarless.policy.yamlnodes import Node, YamlError, parse_documents

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SERVE_PROTOCOLS = ("http", "tcp", "udp")
IP_FAMILIES = ("ipv4", "ipv6", "dual")
DEFAULT_IP_FAMILY = "dual"
_POD_FIELDS = {"name", "namespace", "labels", "serve", "serviceAccount", "node"}
_EXTERNAL_FIELDS = {"name", "ip", "serve", "node"}
MAX_NODES = 254  # node n owns 10.244.n.0/24


class PodsFileError(Exception):
    """The pod file is invalid; the message names file, line and field."""


@dataclass(frozen=True)
class Serve:
    port: int
    protocol: str  # http, tcp or udp
    name: str | None = None

    @property
    def transport(self) -> str:
        return "UDP" if self.protocol == "udp" else "TCP"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str  # "" for an external host
    labels: tuple[tuple[str, str], ...]
    serve: tuple[Serve, ...]
    service_account: str = "default"
    external_ip: str | None = None  # set for an external host
    ip_family: str = DEFAULT_IP_FAMILY  # the pod file's ipFamily
    node: str = ""  # the node it runs on; "": the first

    @property
    def ipv4(self) -> bool:
        return self.ip_family != "ipv6"

    @property
    def ipv6(self) -> bool:
        return self.ip_family != "ipv4"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


def parse_pods(file: str, text: str) -> list[Pod]:
    """Pods, then external hosts."""
    try:
        documents = parse_documents(text)
    except YamlError as error:
        raise PodsFileError(f"{file}:{error.line}: invalid YAML: {error.message}") from None
    if len(documents) != 1 or not isinstance(documents[0].value, dict):
        raise PodsFileError(f"{file}:1: pods: required field is missing")
    top = documents[0].value
    for key in top:
        if key not in ("pods", "external", "ipFamily"):
            raise PodsFileError(
                f"{file}:{documents[0].key_line(key)}: {key}: unknown field (known: external, ipFamily, pods)"
            )

    def fail(node: Node, path: str, message: str) -> PodsFileError:
        return PodsFileError(f"{file}:{node.line}: {path}: {message}")

    family = top.get("ipFamily", Node(DEFAULT_IP_FAMILY, 1))
    if family.value not in IP_FAMILIES:
        raise fail(family, "ipFamily", f"must be one of {', '.join(IP_FAMILIES)}, not {family.value!r}")
    pods = [
        replace(pod, ip_family=family.value)
        for pod in _entries(top.get("pods", Node([], 1)), "pods", lambda n, p: _pod(n, p, fail), fail)
    ]
    externals = _entries(top.get("external", Node([], 1)), "external", lambda n, p: _external(n, p, fail), fail)
    names = [pod.key for pod in pods] + [pod.name for pod in externals]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PodsFileError(f"{file}:1: pods: duplicate name {duplicates[0]}")
    if len(node_names(pods + externals)) > MAX_NODES:
        raise PodsFileError(f"{file}:1: pods: more than {MAX_NODES} nodes")
    return pods + externals


Fail = Callable[[Node, str, str], PodsFileError]


def _entries(node: Node, path: str, parse: Callable[[Node, str], Pod], fail: Fail) -> list[Pod]:
    if not isinstance(node.value, list):
        raise fail(node, path, "must be a list")
    return [parse(item, f"{path}[{index}]") for index, item in enumerate(node.value)]


def _fields(node: Node, path: str, known: set[str], fail: Fail) -> dict[str, Node]:
    if not isinstance(node.value, dict):
        raise fail(node, path, "must be a mapping")
    for key in node.value:
        if key not in known:
            raise fail(
                Node(None, node.key_line(key)),
                f"{path}.{key}",
                f"unknown field (known: {', '.join(sorted(known))})",
            )
    fields: dict[str, Node] = node.value
    return fields


def _name(fields: dict[str, Node], key: str, node: Node, path: str, fail: Fail) -> str:
    value = fields.get(key)
    if value is None or not isinstance(value.value, str) or not _DNS_LABEL.match(value.value):
        raise fail(value or node, f"{path}.{key}", "required, a DNS label (a-z, 0-9, -)")
    return value.value


def _pod(node: Node, path: str, fail: Fail) -> Pod:
    fields = _fields(node, path, _POD_FIELDS, fail)
    labels_node = fields.get("labels", Node({}, node.line))
    if not isinstance(labels_node.value, dict) or not all(isinstance(v.value, str) for v in labels_node.value.values()):
        raise fail(labels_node, f"{path}.labels", "must map label names to strings")
    labels = tuple(sorted((key, value.value) for key, value in labels_node.value.items()))
    account = _name(fields, "serviceAccount", node, path, fail) if "serviceAccount" in fields else "default"
    return Pod(
        _name(fields, "name", node, path, fail),
        _name(fields, "namespace", node, path, fail),
        labels,
        _serve(fields.get("serve", Node([], node.line)), f"{path}.serve", fail),
        account,
        node=_name(fields, "node", node, path, fail) if "node" in fields else "",
    )


def _external(node: Node, path: str, fail: Fail) -> Pod:
    fields = _fields(node, path, _EXTERNAL_FIELDS, fail)
    ip_node = fields.get("ip")
    try:
        ip = ipaddress.ip_address(ip_node.value if ip_node is not None else "")
    except ValueError:
        raise fail(ip_node or node, f"{path}.ip", "required, an IPv4 or IPv6 address") from None
    pod_network = POD_NETWORK6_PREFIX if ip.version == 6 else "10.244.0.0/16"
    if ip in ipaddress.ip_network(pod_network):
        raise fail(ip_node or node, f"{path}.ip", f"must be outside the pod network {pod_network}")
    return Pod(
        _name(fields, "name", node, path, fail),
        "",
        (),
        _serve(fields.get("serve", Node([], node.line)), f"{path}.serve", fail),
        external_ip=str(ip),
        node=_name(fields, "node", node, path, fail) if "node" in fields else "",
    )


def _serve(node: Node, path: str, fail: Fail) -> tuple[Serve, ...]:
    if not isinstance(node.value, list):
        raise fail(node, path, "must be a list")
    serve = []
    for index, item in enumerate(node.value):
        item_path = f"{path}[{index}]"
        fields = _fields(item, item_path, {"port", "protocol", "name"}, fail)
        port = fields.get("port")
        if port is None or not isinstance(port.value, int) or not 0 < port.value < 65536:
            raise fail(port or item, f"{item_path}.port", "required, a port number 1-65535")
        protocol = fields.get("protocol", Node("http", item.line))
        if protocol.value not in SERVE_PROTOCOLS:
            raise fail(protocol, f"{item_path}.protocol", f"must be one of {', '.join(SERVE_PROTOCOLS)}")
        name = fields.get("name")
        if name is not None and not (isinstance(name.value, str) and _DNS_LABEL.match(name.value)):
            raise fail(name, f"{item_path}.name", "must be a port name (a-z, 0-9, -)")
        serve.append(Serve(port.value, protocol.value, name.value if name is not None else None))
    return tuple(serve)


# Node n (1, 2, ...) owns 10.244.n.0/24 and fd00:10:244:n::/64 for its pods, and has the address 10.244.0.n
# (fd00:10:244::n); IPv6 is a ULA /48 for the lab's cluster. One node: node 1.
POD_NETWORK6_PREFIX = "fd00:10:244::/48"
FIRST_POD_HOST = 10
# What a pod's IPv6 default route points at: the node's side of every veth (measured: DATAPATH.md).
NODE_LINK_LOCAL6 = "fe80::1"


def node_ip(index: int) -> str:
    return f"10.244.0.{index}"


def node_ip6(index: int) -> str:
    return f"fd00:10:244::{index:x}"


def pod_cidrs(index: int) -> tuple[str, str]:
    """Node `index`'s pod networks: IPv4, IPv6."""
    return f"10.244.{index}.0/24", f"fd00:10:244:{index:x}::/64"


NODE_IP = node_ip(1)
NODE_IP6 = node_ip6(1)


def node_names(pods: list[Pod]) -> list[str]:
    """The nodes the pod file names, in the order they first appear; empty: one node, unnamed."""
    return list(dict.fromkeys(pod.node for pod in pods if pod.node))


@dataclass(frozen=True)
class Placement:
    pod: Pod
    ip: str  # IPv4; "" for an IPv6-only pod or external host
    interface: str  # the node side of its veth
    ip6: str = ""  # IPv6; "" for an IPv4-only pod or external host
    node: int = 1  # the node's index


def place(pods: list[Pod]) -> list[Placement]:
    """Nodes, addresses and interfaces, in file order: on node n, pods get 10.244.n.10, .11, ... (and
    fd00:10:244:n::a, ::b, ... by their ipFamily) on lxc0, lxc1, ...; external hosts their own address on ext0,
    ext1, ... The lab and `policy trace` agree on them."""
    names = node_names(pods)
    placements = []
    pods_on: dict[int, int] = {}
    externals_on: dict[int, int] = {}
    for pod in pods:
        node = names.index(pod.node) + 1 if pod.node else 1
        if pod.external_ip is None:
            index = pods_on.get(node, 0)
            pods_on[node] = index + 1
            host = FIRST_POD_HOST + index
            ip = f"10.244.{node}.{host}" if pod.ipv4 else ""
            ip6 = f"fd00:10:244:{node:x}::{host:x}" if pod.ipv6 else ""
            placements.append(Placement(pod, ip, f"lxc{index}", ip6, node))
        else:
            index = externals_on.get(node, 0)
            externals_on[node] = index + 1
            ipv6 = ":" in pod.external_ip
            external = ("", pod.external_ip) if ipv6 else (pod.external_ip, "")
            placements.append(Placement(pod, external[0], f"ext{index}", external[1], node))
    return placements


def node_addresses(placements: list[Placement], node: int = 1) -> tuple[str, ...]:
    """Node `node`'s own addresses: IPv4, and IPv6 when a pod has it."""
    ipv6 = any(p.ip6 for p in placements if p.pod.external_ip is None)
    return (node_ip(node), *((node_ip6(node),) if ipv6 else ()))


def endpoints_of(placements: list[Placement]) -> list[Endpoint]:
    return [
        Endpoint(
            name=placement.pod.name,
            namespace=placement.pod.namespace,
            labels=placement.pod.labels,
            ip=placement.ip,
            ip6=placement.ip6,
            interface=placement.interface,
            service_account=placement.pod.service_account,
            named_ports=tuple(NamedPort(s.name, s.port, s.transport) for s in placement.pod.serve if s.name),
        )
        for placement in placements
        if placement.pod.external_ip is None
    ]
