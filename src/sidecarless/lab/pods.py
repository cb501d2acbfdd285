"""The lab's pod file: `pods: [{name, namespace, labels, serve: [{port, protocol, name}]}]`. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecarless.policy.yamlnodes import Node, YamlError, parse_documents

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SERVE_PROTOCOLS = ("http", "tcp")


class PodsFileError(Exception):
    """The pod file is invalid; the message names file, line and field."""


@dataclass(frozen=True)
class Serve:
    port: int
    protocol: str  # http or tcp
    name: str | None = None


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    serve: tuple[Serve, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_pods(file: str, text: str) -> list[Pod]:
    try:
        documents = parse_documents(text)
    except YamlError as error:
        raise PodsFileError(f"{file}:{error.line}: invalid YAML: {error.message}") from None
    if len(documents) != 1 or not isinstance(documents[0].value, dict) or "pods" not in documents[0].value:
        raise PodsFileError(f"{file}:1: pods: required field is missing")

    def fail(node: Node, path: str, message: str) -> PodsFileError:
        return PodsFileError(f"{file}:{node.line}: {path}: {message}")

    pods_node = documents[0].value["pods"]
    if not isinstance(pods_node.value, list):
        raise fail(pods_node, "pods", "must be a list")
    pods: list[Pod] = []
    for index, pod_node in enumerate(pods_node.value):
        path = f"pods[{index}]"
        if not isinstance(pod_node.value, dict):
            raise fail(pod_node, path, "must be a mapping")
        fields = pod_node.value
        for key in fields:
            if key not in ("name", "namespace", "labels", "serve"):
                raise fail(
                    fields[key], f"{path}.{key}", "unknown field (known: labels, name, namespace, serve)"
                )
        for key in ("name", "namespace"):
            value = fields.get(key)
            if value is None or not isinstance(value.value, str) or not _DNS_LABEL.match(value.value):
                raise fail(value or pod_node, f"{path}.{key}", "required, a DNS label (a-z, 0-9, -)")
        labels_node = fields.get("labels", Node({}, pod_node.line))
        if not isinstance(labels_node.value, dict) or not all(
            isinstance(value.value, str) for value in labels_node.value.values()
        ):
            raise fail(labels_node, f"{path}.labels", "must map label names to strings")
        serve = []
        serve_node = fields.get("serve", Node([], pod_node.line))
        if not isinstance(serve_node.value, list):
            raise fail(serve_node, f"{path}.serve", "must be a list")
        for serve_index, item in enumerate(serve_node.value):
            item_path = f"{path}.serve[{serve_index}]"
            item_fields = item.value if isinstance(item.value, dict) else None
            if item_fields is None:
                raise fail(item, item_path, "must be a mapping")
            port = item_fields.get("port")
            if port is None or not isinstance(port.value, int) or not 0 < port.value < 65536:
                raise fail(port or item, f"{item_path}.port", "required, a port number 1-65535")
            protocol = item_fields.get("protocol", Node("http", item.line))
            if protocol.value not in SERVE_PROTOCOLS:
                raise fail(protocol, f"{item_path}.protocol", f"must be one of {', '.join(SERVE_PROTOCOLS)}")
            name = item_fields.get("name")
            serve.append(Serve(port.value, protocol.value, name.value if name is not None else None))
        labels = tuple(sorted((key, value.value) for key, value in labels_node.value.items()))
        pods.append(Pod(fields["name"].value, fields["namespace"].value, labels, tuple(serve)))
    keys = [pod.key for pod in pods]
    if len(set(keys)) != len(keys):
        raise PodsFileError(
            f"{file}:1: pods: duplicate pod {sorted(k for k in keys if keys.count(k) > 1)[0]}"
        )
    return pods
