"""Kubernetes source: CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (cilium.io/v2), Namespaces, this
node's Node and Pods, and other nodes' Pods, each by list + watch.

Requests go through sources/kubernetes_api.py (aiohttp, which the agent already uses: a watch is a coroutine on
the agent's event loop that a cancel ends at once). The list/watch loop is client-go's reflector, small: list,
watch from the list's version, resume from the last version seen, relist on 410, bookmarks.

A policy the API server accepted but sidecarless cannot honour (a field it does not implement, a regex over
Envoy's limit) is rejected like a bad file: its last good version stays, the rest stays in force, and the
object's status says so for this node (`status.nodes.<node>`, as Cilium writes it) when RBAC allows the patch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aiohttp

from sidecarless.observe.logs import LogKey
from sidecarless.policy.model import Endpoint, NamedPort, Node
from sidecarless.policy.reader import PolicyError
from sidecarless.policy.schema import AUDIT_ANNOTATION, parse_policy_bytes
from sidecarless.sources.kubernetes_api import (
    ApiError,
    Credentials,
    KubeApi,
    in_cluster_credentials,
    kubeconfig_credentials,
    message_of,
)
from sidecarless.sources.kubernetes_config import WATCH_TIMEOUT_S, KubeConfigError, KubernetesConfig
from sidecarless.sources.source import LastGoodPolicies, NodeState, PolicySet, SourceUpdate

log = logging.getLogger(__name__)

Object = dict[str, Any]

CILIUM_GROUP, CILIUM_VERSION = "cilium.io", "v2"
CILIUM_PREFIX = f"/apis/{CILIUM_GROUP}/{CILIUM_VERSION}"
POLICY_PLURALS = {
    "CiliumNetworkPolicy": "ciliumnetworkpolicies",
    "CiliumClusterwideNetworkPolicy": "ciliumclusterwidenetworkpolicies",
}
POLICY_KINDS = set(POLICY_PLURALS)
# Cilium gives every pod its namespace's labels under this prefix, so selectors can name namespaces by label.
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
REQUEST_TIMEOUT_S = 30.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 30.0
STOP_TIMEOUT_S = 5.0
# The timeout goes to the client: asyncio.wait_for on Python 3.11 can swallow a cancel that arrives as the
# request completes, and the agent would never stop (seen in tests).
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
# A pod whose route the CNI has not made yet is looked for again this often.
INTERFACE_RETRY_S = 1.0


class WatchExpired(Exception):
    """410 Gone: the version to resume from is older than the API server keeps; relist."""


class WatchFailed(Exception):
    pass


def object_key(obj: Object) -> str:
    metadata = obj["metadata"]
    return f"{metadata['namespace']}/{metadata['name']}" if metadata.get("namespace") else str(metadata["name"])


@dataclass
class Reflector:
    """One resource kept in memory: list, then watch from the list's resourceVersion; on a dropped stream resume
    from the last version seen (bookmarks move it too); on 410 relist; on errors back off with jitter."""

    kind: str
    api: KubeApi
    path: str  # the collection's path (`/api/v1/pods`)
    params: dict[str, str]  # fixed query parameters: a field selector
    on_change: Callable[[], None]
    watch_timeout_s: int = WATCH_TIMEOUT_S
    # Keep `dirty`: the keys added, changed or removed since the source last took them (a change to one of
    # 20,000 policies must not make the source walk the other 19,999).
    track_dirty: bool = False
    # What is kept of each object (None: all of it): a node holds every pod and policy of the cluster.
    transform: Callable[[Object], Object] | None = None
    objects: dict[str, Object] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    resource_version: str = ""
    synced: bool = False
    lists: int = 0
    resumes: int = 0
    errors: int = 0
    last_error: str = ""

    async def run(self) -> None:
        delay_s = BACKOFF_FIRST_S
        while True:
            started = time.monotonic()
            try:
                if not self.resource_version:
                    await self._list()
                await self._watch()
                self.resumes += 1
                if time.monotonic() - started > 1.0:
                    delay_s = BACKOFF_FIRST_S
                    continue
                # A stream that ends at once, again and again, must not become a busy loop.
            except WatchExpired as expired:
                log.info("watch expired, relisting", extra={LogKey.KIND: self.kind, LogKey.ERROR: str(expired)})
                self.resource_version = ""
                continue
            except (WatchFailed, aiohttp.ClientError, TimeoutError, ValueError, KeyError, KubeConfigError) as error:
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
                log.warning("watch failed", extra={LogKey.KIND: self.kind, LogKey.ERROR: self.last_error})
            await asyncio.sleep(delay_s * random.uniform(0.8, 1.2))
            delay_s = min(delay_s * 2, BACKOFF_MAX_S)

    async def _list(self) -> None:
        async with self.api.get(self.path, self.params, REQUEST_TIMEOUT) as response:
            body = await response.read()
            if response.status != 200:
                raise WatchFailed(f"list {self.kind}: HTTP {response.status}: {message_of(body)}")
        document = json.loads(body)
        previous = self.objects
        self.objects = {object_key(obj): self._kept(obj) for obj in document.get("items") or []}
        if self.track_dirty:
            self.dirty |= {
                key for key in previous.keys() | self.objects.keys() if previous.get(key) != self.objects.get(key)
            }
        self.resource_version = document["metadata"]["resourceVersion"]
        self.synced = True
        self.lists += 1
        self.on_change()

    async def _watch(self) -> None:
        params = {
            **self.params,
            "watch": "true",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout_s),
        }
        # No byte for longer than the server's own timeout (plus slack) means the connection is dead.
        read_s = self.watch_timeout_s + REQUEST_TIMEOUT_S
        timeout = aiohttp.ClientTimeout(sock_connect=REQUEST_TIMEOUT_S, sock_read=read_s)
        async with self.api.get(self.path, params, timeout) as response:
            if response.status == 410:
                raise WatchExpired(message_of(await response.read()))
            if response.status != 200:
                raise WatchFailed(f"watch {self.kind}: HTTP {response.status}: {message_of(await response.read())}")
            # Lines, not readline(): one object can exceed aiohttp's line limit.
            buffered = b""
            async for chunk in response.content.iter_any():
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._apply(json.loads(line))

    def _apply(self, event: Object) -> None:
        event_type, obj = event["type"], event["object"]
        if event_type == "ERROR":
            if obj.get("code") == 410:
                raise WatchExpired(obj.get("message", ""))
            raise WatchFailed(f"watch {self.kind}: {obj.get('code')}: {obj.get('message', '')}")
        if event_type in ("ADDED", "MODIFIED"):
            self.objects[object_key(obj)] = self._kept(obj)
        elif event_type == "DELETED":
            self.objects.pop(object_key(obj), None)
        if self.track_dirty and event_type != "BOOKMARK":
            self.dirty.add(object_key(obj))
        self.resource_version = obj["metadata"]["resourceVersion"]
        if event_type != "BOOKMARK":
            self.on_change()

    def _kept(self, obj: Object) -> Object:
        return obj if self.transform is None else self.transform(obj)

    def take_dirty(self) -> set[str]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def status(self) -> dict[str, Any]:
        return {
            "synced": self.synced,
            "objects": len(self.objects),
            "resource_version": self.resource_version,
            "lists": self.lists,
            "resumes": self.resumes,
            "errors": self.errors,
            "last_error": self.last_error,
        }


# Objects to what the compiler takes: pure functions.
def policy_label(kind: str, obj: Object) -> str:
    return label_of(kind, object_key(obj))


def label_of(kind: str, key: str) -> str:
    """A policy object's name as a policy source ("CiliumNetworkPolicy ns/name"): errors and statuses say it."""
    return f"{kind} {key}"


def policy_bytes(kind: str, obj: Object) -> bytes:
    """The object as a policy document (what a file would hold): only what the API server stored of it, no
    status or managed fields, so a status patch does not look like a policy change."""
    metadata = obj["metadata"]
    document: Object = {
        "apiVersion": f"{CILIUM_GROUP}/{CILIUM_VERSION}",
        "kind": kind,
        "metadata": {key: metadata[key] for key in ("name", "namespace", "labels") if key in metadata},
    }
    # Of the annotations only sidecarless's own (kubectl's last-applied copy would make every apply a change).
    annotations = metadata.get("annotations") or {}
    if AUDIT_ANNOTATION in annotations:
        document["metadata"]["annotations"] = {AUDIT_ANNOTATION: annotations[AUDIT_ANNOTATION]}
    document.update({key: obj[key] for key in ("spec", "specs") if key in obj})
    return json.dumps(document, indent=2, sort_keys=True).encode()


DOCUMENT = "document"  # what the source keeps of a policy object: its document, instead of its spec


def slim_policy(kind: str, node_name: str, obj: Object) -> Object:
    """What the source keeps of a policy object: its name, its document (policy_bytes) and this node's entry in
    its status."""
    metadata = obj["metadata"]
    nodes = (obj.get("status") or {}).get("nodes") or {}
    return {
        "metadata": {key: metadata[key] for key in ("name", "namespace") if key in metadata},
        DOCUMENT: policy_bytes(kind, obj),
        "status": {"nodes": {node_name: nodes[node_name]}} if node_name in nodes else {},
    }


def slim_pod(pod: Object) -> Object:
    """What the source reads of a pod (pod_endpoint, pod_addresses): a real pod's object is tens of kB
    (containers, volumes, managed fields), and a node holds every pod of the cluster. Repeated strings
    (namespaces, label keys and values) are shared."""
    metadata, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    containers = [
        {"ports": [port for port in container.get("ports") or [] if port.get("name")]}
        for container in spec.get("containers") or []
    ]
    kept_spec = {key: spec[key] for key in ("hostNetwork", "serviceAccountName") if key in spec}
    if any(container["ports"] for container in containers):
        kept_spec["containers"] = [container for container in containers if container["ports"]]
    return {
        "metadata": {
            "name": metadata["name"],
            "namespace": _shared(metadata["namespace"]),
            "labels": {_shared(k): _shared(v) for k, v in (metadata.get("labels") or {}).items()},
        },
        "spec": kept_spec,
        "status": {key: _shared(status[key]) for key in ("podIP", "podIPs", "phase") if key in status},
    }


def _shared(value: Any) -> Any:
    """One copy of a string 100,000 pods repeat."""
    return sys.intern(value) if type(value) is str else value


def pod_endpoint(pod: Object, namespace_labels: dict[str, str], interface: str, local: bool) -> Endpoint | None:
    """A pod with an address as an endpoint; None for pods without one, host-network pods (they are the host)
    and pods that have ended."""
    spec, status, metadata = pod.get("spec", {}), pod.get("status", {}), pod["metadata"]
    ip, ip6 = pod_addresses(pod)
    if not (ip or ip6) or spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    labels = {**(metadata.get("labels") or {}), **{NAMESPACE_LABELS_PREFIX + k: v for k, v in namespace_labels.items()}}
    named_ports = tuple(
        NamedPort(port["name"], int(port["containerPort"]), port.get("protocol", "TCP"))
        for container in spec.get("containers", [])
        for port in container.get("ports") or []
        if port.get("name")
    )
    return Endpoint(
        name=metadata["name"],
        namespace=metadata["namespace"],
        labels=tuple(sorted(labels.items())),
        ip=ip,
        ip6=ip6,
        interface=interface,
        service_account=spec.get("serviceAccountName") or "default",
        named_ports=named_ports,
        local=local,
    )


def pod_addresses(pod: Object) -> tuple[str, str]:
    """(IPv4, IPv6) of a pod, "" where it has none: `status.podIPs` (dual-stack), else `status.podIP`."""
    status = pod.get("status", {})
    listed = [entry.get("ip", "") for entry in status.get("podIPs") or []] or [status.get("podIP") or ""]
    ip4 = next((ip for ip in listed if ip and ":" not in ip), "")
    ip6 = next((ip for ip in listed if ":" in ip), "")
    return ip4, ip6


def primary_address(pod: Object) -> str:
    """The address the node routes the pod by, for finding its interface: IPv4 where it has one."""
    ip4, ip6 = pod_addresses(pod)
    return ip4 or ip6


def node_addresses(node: Object | None) -> tuple[str, ...]:
    addresses = (node or {}).get("status", {}).get("addresses") or []
    return tuple(sorted({a["address"] for a in addresses if a.get("type") in ("InternalIP", "ExternalIP")}))


def node_status_entry(errors: tuple[PolicyError, ...], now: str) -> Object:
    """This node's entry in a policy's `status.nodes`, in Cilium's shape."""
    if errors:
        return {"ok": False, "enforcing": False, "error": "; ".join(str(e) for e in errors), "lastUpdated": now}
    return {"ok": True, "enforcing": True, "lastUpdated": now}


class KubernetesSource:
    def __init__(self, config: KubernetesConfig, interfaces_of: Callable[[Collection[str]], dict[str, str]]) -> None:
        self.config = config
        # Pod IPs -> their host-side interfaces (netlink, or a table in tests); blocking, so run in a thread.
        self.interfaces_of = interfaces_of
        self.reflectors: dict[str, Reflector] = {}
        self.policies = LastGoodPolicies()
        self.pods_without_interface: list[str] = []
        self.status_patches = 0
        self.status_forbidden = False
        self._changed = asyncio.Event()
        self._changed_kinds: set[str] = set()
        self._documents: dict[str, bytes] = {}  # label -> the object as a policy document
        self._document_digests: dict[str, bytes] = {}  # label -> sha256 of label and document
        self._label_order: list[str] = []  # the labels of `_documents`, sorted again only when they change
        self._unreported: set[tuple[str, str]] = set()  # (kind, key): objects whose status may need writing
        self._reported_rejected: dict[str, tuple[PolicyError, ...]] = {}
        # Read now: credentials that cannot be used stop the agent at its start, with the file and field.
        self._api = KubeApi(credentials_of(config))

    def _make_reflectors(self, api: KubeApi) -> dict[str, Reflector]:
        node = self.config.node_name
        paths: dict[str, tuple[str, dict[str, str]]] = {
            **{kind: (f"{CILIUM_PREFIX}/{plural}", {}) for kind, plural in POLICY_PLURALS.items()},
            "Namespace": ("/api/v1/namespaces", {}),
            "Node": ("/api/v1/nodes", {}),  # every node: this one is the host, the others remote nodes
            "Pod": ("/api/v1/pods", {"fieldSelector": f"spec.nodeName={node}"}),
            "RemotePod": ("/api/v1/pods", {"fieldSelector": f"spec.nodeName!={node}"}),
        }
        transforms = {"Pod": slim_pod, "RemotePod": slim_pod}
        return {
            kind: Reflector(
                kind,
                api,
                path,
                params,
                partial(self._mark_changed, kind),
                self.config.watch_timeout_s,
                track_dirty=kind in POLICY_PLURALS,
                transform=partial(slim_policy, kind, node) if kind in POLICY_PLURALS else transforms.get(kind),
            )
            for kind, (path, params) in paths.items()
        }

    async def updates(self) -> AsyncIterator[SourceUpdate]:
        self.reflectors = self._make_reflectors(self._api)
        tasks = [asyncio.create_task(r.run(), name=f"watch {kind}") for kind, r in self.reflectors.items()]
        last_policy_digest: str | None = None
        last_node: NodeState | None = None
        try:
            while True:
                await self._wait_for_change()
                if not all(reflector.synced for reflector in self.reflectors.values()):
                    continue
                # Only what changed is rebuilt: a policy change must not walk 10,000 pods, nor a pod change
                # every policy.
                changed, self._changed_kinds = self._changed_kinds, set()
                policy_set = self.policy_set() if changed & POLICY_KINDS or last_policy_digest is None else None
                node = None
                if changed - POLICY_KINDS or last_node is None or self.pods_without_interface:
                    local_ips = [primary_address(pod) for pod in self.reflectors["Pod"].objects.values()]
                    interfaces = await asyncio.to_thread(self.interfaces_of, [ip for ip in local_ips if ip])
                    node = self.node_state(interfaces)
                update = SourceUpdate(
                    policy_set if policy_set is not None and policy_set.digest != last_policy_digest else None,
                    node if node is not None and node != last_node else None,
                )
                if update.policy_set is None and update.node is None:
                    continue
                last_policy_digest = update.policy_set.digest if update.policy_set else last_policy_digest
                last_node = update.node or last_node
                yield update
                if update.policy_set is not None:
                    await self._report(update.policy_set)  # after the agent has taken the update: enforcement first
        finally:
            for task in tasks:
                task.cancel()
            _, running = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            for task in running:  # never seen; a hang at shutdown must say where it is
                log.error("watch did not stop", extra={LogKey.KIND: task.get_name(), LogKey.ERROR: task.get_stack()})
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self._api.close()

    def _mark_changed(self, kind: str) -> None:
        self._changed_kinds.add(kind)
        self._changed.set()

    async def _wait_for_change(self) -> None:
        if self.pods_without_interface:
            try:
                async with asyncio.timeout(INTERFACE_RETRY_S):
                    await self._changed.wait()
            except TimeoutError:
                pass
        else:
            await self._changed.wait()
        self._changed.clear()

    def policy_set(self) -> PolicySet:
        """The policy set, rebuilt from the objects that changed since the last call."""
        changed: set[str] = set()
        relabelled = False  # a label added or removed: sorted again
        for kind in POLICY_PLURALS:
            reflector = self.reflectors[kind]
            for key in reflector.take_dirty():
                label = label_of(kind, key)
                obj = reflector.objects.get(key)
                if obj is None:
                    changed.add(label)
                    relabelled |= self._documents.pop(label, None) is not None
                    self._document_digests.pop(label, None)
                    continue
                raw = obj[DOCUMENT]
                if self._documents.get(label) == raw:
                    obj[DOCUMENT] = raw = self._documents[label]  # one copy of 20,000 documents, not two
                    if self._status_says(obj, label):
                        continue  # only its status moved (this node's own write, or another node's)
                self._unreported.add((kind, key))
                if self._documents.get(label) is not raw:
                    changed.add(label)
                    relabelled |= label not in self._documents
                    self._documents[label] = raw
                    self._document_digests[label] = hashlib.sha256(label.encode() + b"\0" + raw).digest()
        if relabelled:
            self._label_order = sorted(self._documents)
        digest = hashlib.sha256(b"".join(self._document_digests[label] for label in self._label_order))
        return self.policies.update(self._documents, parse_policy_bytes, digest.hexdigest()[:16], changed)

    def node_state(self, interfaces: dict[str, str]) -> NodeState:
        namespace_labels = {
            name: obj["metadata"].get("labels") or {} for name, obj in self.reflectors["Namespace"].objects.items()
        }
        endpoints: list[Endpoint] = []
        missing: list[str] = []
        for kind, local in (("Pod", True), ("RemotePod", False)):
            for key, pod in sorted(self.reflectors[kind].objects.items()):
                ip = primary_address(pod)
                interface = interfaces.get(ip, "") if ip and local else ""
                endpoint = pod_endpoint(pod, namespace_labels.get(pod["metadata"]["namespace"], {}), interface, local)
                if endpoint is not None and local and not interface:
                    missing.append(key)  # no route to it yet: not enforceable until the CNI is done
                elif endpoint is not None:
                    endpoints.append(endpoint)
        self.pods_without_interface = missing
        nodes = self.reflectors["Node"].objects
        own = node_addresses(nodes.get(self.config.node_name))
        remote = tuple(
            sorted({ip for name, obj in nodes.items() if name != self.config.node_name for ip in node_addresses(obj)})
        )
        return NodeState(
            tuple(endpoints),
            Node(ips=own, cluster_name=self.config.cluster_name, remote_ips=remote),
            self.config.devices,
        )

    def _status_says(self, obj: Object, label: str) -> bool:
        """The object's status holds the verdict this node last reported on it."""
        current = ((obj.get("status") or {}).get("nodes") or {}).get(self.config.node_name) or {}
        return _same_verdict(node_status_entry(self._reported_rejected.get(label, ()), ""), current)

    async def _report(self, policy_set: PolicySet) -> None:
        """Write this node's verdict on each policy into its status, when it changed (RBAC permitting): the
        objects that changed since the last report (a status written comes back as one), and those whose
        verdict changed."""
        if self.status_forbidden:
            return
        verdict_changed = {
            label
            for label in policy_set.rejected.keys() | self._reported_rejected.keys()
            if policy_set.rejected.get(label) != self._reported_rejected.get(label)
        }
        self._reported_rejected = dict(policy_set.rejected)
        pending = self._unreported | {tuple(label.split(" ", 1)) for label in verdict_changed}
        self._unreported = set()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for kind, key in sorted(pending):
            obj = self.reflectors[kind].objects.get(key) if kind in POLICY_PLURALS else None
            if obj is None:
                continue  # deleted
            if not await self._write_status(kind, obj, policy_set, now):
                self._unreported.add((kind, key))  # tried again at the next report
            if self.status_forbidden:
                return

    async def _write_status(self, kind: str, obj: Object, policy_set: PolicySet, now: str) -> bool:
        """False: not written and worth trying again."""
        label = policy_label(kind, obj)
        if self._status_says(obj, label):
            return True
        entry = node_status_entry(policy_set.rejected.get(label, ()), now)
        body = {"status": {"nodes": {self.config.node_name: entry}}}
        metadata = obj["metadata"]
        namespace = f"/namespaces/{metadata['namespace']}" if metadata.get("namespace") else ""
        path = f"{CILIUM_PREFIX}{namespace}/{POLICY_PLURALS[kind]}/{metadata['name']}/status"
        try:
            await self._api.merge_patch(path, body, REQUEST_TIMEOUT)
        except ApiError as error:
            if error.status == 403:
                self.status_forbidden = True
                log.warning("policy status not written: RBAC forbids patching it", extra={LogKey.KIND: kind})
                return True
            if error.status == 404:
                return True  # deleted meanwhile
            log.warning("policy status not written", extra={LogKey.KIND: kind, LogKey.ERROR: str(error)})
            return False
        except (aiohttp.ClientError, TimeoutError, KubeConfigError) as error:
            log.warning("policy status not written", extra={LogKey.KIND: kind, LogKey.ERROR: str(error)})
            return False
        self.status_patches += 1
        return True

    def status(self) -> dict[str, Any]:
        return {
            "kind": "kubernetes",
            "node": self.config.node_name,
            "watches": {kind: reflector.status() for kind, reflector in self.reflectors.items()},
            "pods_without_interface": list(self.pods_without_interface),
            "policy_status_patches": self.status_patches,
            "policy_status_forbidden": self.status_forbidden,
        }


def _same_verdict(a: Object, b: Object) -> bool:
    return all(a.get(key) == b.get(key) for key in ("ok", "enforcing", "error"))


def credentials_of(config: KubernetesConfig) -> Credentials:
    """--k8s-api-server (a URL without credentials: tests, the lab), else the kubeconfig, else the pod's own."""
    if config.api_server is not None:
        return Credentials(config.api_server, source="--k8s-api-server")
    if config.kubeconfig is not None:
        return kubeconfig_credentials(config.kubeconfig)
    return in_cluster_credentials()
