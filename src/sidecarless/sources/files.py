"""Standalone sources: a directory of policy YAML files and a JSON file of endpoints (this node's, or every node's
with its node named).

A file that fails validation is reported and its last accepted version stays in force: rejecting one file
never removes or changes policies already accepted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from sidecarless.policy.model import Endpoint, NamedPort, Node
from sidecarless.policy.reader import PolicyError, PolicyFileError
from sidecarless.policy.schema import MAX_FILE_BYTES, PolicyDocuments, parse_policy_bytes
from sidecarless.sources.inotify import DirectoryWatch
from sidecarless.sources.source import LastGoodPolicies, NodeState, PolicySet, SourceUpdate

POLICY_SUFFIXES = (".yaml", ".yml", ".json")


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


def read_policy_files(directory: Path) -> dict[Path, bytes]:
    """The policy files' contents. A file removed between listing and reading is left out: its removal is
    the change the next read sees (an editor or `kubectl cp` may replace files at any moment)."""
    contents = {}
    try:
        paths = policy_files(directory)
    except FileNotFoundError:
        return {}
    for path in paths:
        try:
            contents[path] = path.read_bytes()
        except FileNotFoundError:
            continue
    return contents


def directory_digest(directory: Path) -> str:
    return _digest(read_policy_files(directory))


def _digest(contents: dict[Path, bytes]) -> str:
    digest = hashlib.sha256()
    for path, raw in contents.items():
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
    return digest.hexdigest()[:16]


def read_policy_file(path: Path, label: str) -> PolicyDocuments:
    """Policies in one file; PolicyFileError naming `label` for anything wrong, including the bytes."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PolicyFileError([PolicyError(label, 1, "", f"file is {size} bytes, more than {MAX_FILE_BYTES}")])
    return parse_policy_bytes(label, path.read_bytes())


class PolicyDirectory:
    """Reads a directory of policy files, keeping the last good version of each file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._policies = LastGoodPolicies()
        self._digest: str | None = None

    def read_if_changed(self) -> PolicySet | None:
        contents = read_policy_files(self.directory)
        digest = _digest(contents)
        if digest == self._digest:
            return None
        self._digest = digest
        files = {str(path): raw for path, raw in contents.items()}
        return self._policies.update(files, parse_policy_bytes, digest)


def read_endpoints(path: Path, node_name: str = "node") -> NodeState:
    """Endpoints file (written by the lab): {"endpoints": [{name, namespace, labels, ip, ip6, interface,
    service_account, named_ports: [{name, port, protocol}], node}], "node": {ips, cluster_name, interfaces},
    "nodes": [{name, ips, interfaces}]}. Several nodes share one file: an endpoint whose `node` is another's is
    a remote pod (no interface here), and `nodes` gives each node's addresses (this node's: the host; the
    others': remote-node) and the interfaces that are no pod's (this node's are watched). Without `node` an
    endpoint is this node's; without this node in `nodes`, `node` describes it."""
    document = json.loads(path.read_text())
    endpoints = tuple(_endpoint(item, item.get("node", node_name) == node_name) for item in document["endpoints"])
    nodes = {entry["name"]: entry for entry in document.get("nodes", ())}
    this = nodes.get(node_name, document.get("node", {}))
    remote = tuple(sorted({ip for name, entry in nodes.items() if name != node_name for ip in entry.get("ips", ())}))
    return NodeState(
        endpoints,
        Node(
            ips=tuple(this.get("ips", ())),
            cluster_name=document.get("node", {}).get("cluster_name", "default"),
            remote_ips=remote,
        ),
        tuple(this.get("interfaces", ())),
    )


def _endpoint(item: dict[str, Any], local: bool) -> Endpoint:
    """One entry of the endpoints file; another node's pod has no interface here."""
    return Endpoint(
        name=item["name"],
        namespace=item["namespace"],
        labels=tuple(sorted(item.get("labels", {}).items())),
        ip=item.get("ip", ""),
        ip6=item.get("ip6", ""),
        interface=item["interface"] if local else "",
        service_account=item.get("service_account", "default"),
        named_ports=tuple(
            NamedPort(port["name"], int(port["port"]), port.get("protocol", "TCP"))
            for port in item.get("named_ports", [])
        ),
        local=local,
    )


class FileSource:
    """The standalone source: the policy directory and the endpoints file, read again whenever inotify reports a
    change in either directory (an editor's save, a `kubectl cp`, a ConfigMap update are all seen the same
    way), and every `rescan_interval_s` in case a directory appeared that could not be watched before."""

    def __init__(
        self, policies_dir: Path, endpoints_file: Path, rescan_interval_s: float = 2.0, node_name: str = "node"
    ) -> None:
        self.directory = PolicyDirectory(policies_dir)
        self.endpoints_file = endpoints_file
        self.rescan_interval_s = rescan_interval_s
        self.node_name = node_name  # which of the file's nodes this one is

    async def updates(self) -> AsyncGenerator[SourceUpdate, None]:
        endpoints_mtime = -1.0
        watch = DirectoryWatch([self.directory.directory, self.endpoints_file.parent])
        try:
            watch.watch()  # before reading: a change made while reading wakes the next wait
            while True:
                policy_set = await asyncio.to_thread(self.directory.read_if_changed)
                node = None
                try:
                    mtime = self.endpoints_file.stat().st_mtime
                except FileNotFoundError:
                    mtime = endpoints_mtime
                if mtime != endpoints_mtime:
                    endpoints_mtime = mtime
                    node = read_endpoints(self.endpoints_file, self.node_name)
                if policy_set is not None or node is not None:
                    yield SourceUpdate(policy_set, node)
                await watch.wait(self.rescan_interval_s)
        finally:
            watch.close()

    def status(self) -> dict[str, Any]:
        return {"kind": "files", "policies": str(self.directory.directory), "endpoints": str(self.endpoints_file)}


def validate_policies(directory: Path) -> list[str]:
    """Every error in a policy directory, as `file:line: field: message` lines. A directory that does not
    exist holds no policies."""
    if not directory.exists():
        return []
    if not directory.is_dir():
        return [f"{directory}: not a directory"]
    errors: list[str] = []
    for path in policy_files(directory):
        try:
            read_policy_file(path, str(path))
        except PolicyFileError as error:
            errors += [str(item) for item in error.errors]
    return errors
