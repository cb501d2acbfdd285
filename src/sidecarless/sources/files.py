"""Standalone sources: a directory of policy YAML files and a JSON file of this node's endpoints.

A file that fails validation is reported and its last accepted version stays in force: rejecting one file
never removes or changes policies already accepted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sidecarless.policy.compile import Endpoint, NamedPort, Node
from sidecarless.policy.model import Policy, Secret
from sidecarless.policy.schema import (
    MAX_FILE_BYTES,
    PolicyDocuments,
    PolicyError,
    PolicyFileError,
    parse_policy_file,
)

POLICY_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...]
    secrets: tuple[Secret, ...]
    rejected: dict[str, tuple[PolicyError, ...]]  # file -> its errors (its last good version, if any, is kept)
    digest: str  # of the files as read, so a writer can tell when its change has been seen


def policy_files(directory: Path) -> list[Path]:
    """Policy files in a directory, in name order; dot files (editors' and atomic writers' temporaries) are
    not policies. A directory that does not exist holds none."""
    if not directory.is_dir():
        return []
    return sorted(
        path
        for path in directory.iterdir()
        if path.suffix in POLICY_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in policy_files(directory):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def read_policy_file(path: Path, label: str) -> PolicyDocuments:
    """Policies in one file; PolicyFileError naming `label` for anything wrong, including the bytes."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PolicyFileError([PolicyError(label, 1, "", f"file is {size} bytes, more than {MAX_FILE_BYTES}")])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PolicyFileError([PolicyError(label, line, "", "file is not UTF-8")]) from None
    return parse_policy_file(label, text)


class PolicyDirectory:
    """Reads a directory of policy files, keeping the last good version of each file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._accepted: dict[str, tuple[bytes, PolicyDocuments]] = {}
        self._digest: str | None = None

    def read_if_changed(self) -> PolicySet | None:
        digest = directory_digest(self.directory)
        if digest == self._digest:
            return None
        self._digest = digest
        rejected: dict[str, tuple[PolicyError, ...]] = {}
        present = set()
        for path in policy_files(self.directory):
            label = str(path)
            present.add(label)
            raw = path.read_bytes()
            if label in self._accepted and self._accepted[label][0] == raw:
                continue
            try:
                self._accepted[label] = (raw, read_policy_file(path, label))
            except PolicyFileError as error:
                rejected[label] = tuple(error.errors)
        for label in set(self._accepted) - present:
            del self._accepted[label]
        accepted = [documents for _, (_, documents) in sorted(self._accepted.items())]
        policies = tuple(policy for documents in accepted for policy in documents.policies)
        secrets = tuple(secret for documents in accepted for secret in documents.secrets)
        return PolicySet(policies, secrets, rejected, digest)


@dataclass(frozen=True)
class NodeState:
    """This node as the endpoints file describes it: its pods, addresses and other interfaces."""

    endpoints: tuple[Endpoint, ...]
    node: Node
    interfaces: tuple[str, ...]  # non-pod interfaces traffic enters the node by (the lab's "world")


def read_endpoints(path: Path) -> NodeState:
    """Endpoints file (written by the lab): {"endpoints": [{name, namespace, labels, ip, interface,
    service_account, named_ports: [{name, port, protocol}]}], "node": {ips, cluster_name, interfaces}}."""
    document = json.loads(path.read_text())
    endpoints = tuple(
        Endpoint(
            name=item["name"],
            namespace=item["namespace"],
            labels=tuple(sorted(item.get("labels", {}).items())),
            ip=item["ip"],
            interface=item["interface"],
            service_account=item.get("service_account", "default"),
            named_ports=tuple(
                NamedPort(port["name"], int(port["port"]), port.get("protocol", "TCP"))
                for port in item.get("named_ports", [])
            ),
        )
        for item in document["endpoints"]
    )
    node = document.get("node", {})
    return NodeState(
        endpoints,
        Node(ips=tuple(node.get("ips", ())), cluster_name=node.get("cluster_name", "default")),
        tuple(node.get("interfaces", ())),
    )
