"""A fake Kubernetes API server (aiohttp) for tests and the lab: no real API server can run on this machine.

It implements what the agent's Kubernetes source relies on, with the API server's semantics: list with a
resourceVersion, watch from a resourceVersion (history replayed, then live events), `410 Gone` for a version
older than the compacted history, BOOKMARK events when asked for, `timeoutSeconds`, field selectors on
`spec.nodeName` and `metadata.name` (`=` and `!=`), and merge-patch of a custom object's status. Tests drive it
through its methods: put, delete, compact, drop_watches, fail_next.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from sidecarless.api.client import agent_status
from sidecarless.lab.node import Lab, wait_for
from sidecarless.lab.topology import LabNode, LabPod
from sidecarless.policy.yamlnodes import parse_documents, plain
from sidecarless.redirect.netlink import tcp_listener_in_netns
from sidecarless.sources.files import policy_files

Object = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    api_version: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


RESOURCES = {
    resource.plural: resource
    for resource in (
        Resource("pods", "Pod", "v1", namespaced=True),
        Resource("namespaces", "Namespace", "v1", namespaced=False),
        Resource("nodes", "Node", "v1", namespaced=False),
        Resource("ciliumnetworkpolicies", "CiliumNetworkPolicy", "cilium.io/v2", namespaced=True),
        Resource(
            "ciliumclusterwidenetworkpolicies", "CiliumClusterwideNetworkPolicy", "cilium.io/v2", namespaced=False
        ),
    )
}


@dataclass
class _Event:
    resource_version: int
    type: str
    object: Object


@dataclass
class _Watcher:
    resource: Resource
    namespace: str | None
    matches: Callable[[Object], bool]
    queue: asyncio.Queue[_Event | None] = field(default_factory=asyncio.Queue)


def _key(obj: Object) -> tuple[str, str]:
    metadata = obj["metadata"]
    return metadata.get("namespace", ""), metadata["name"]


def _field(obj: Object, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part, {}) if isinstance(value, dict) else {}
    return value if isinstance(value, str) else ""


def field_selector(text: str) -> Callable[[Object], bool]:
    """`spec.nodeName=a,metadata.name!=b` as a predicate (the operators the API server supports)."""
    terms: list[tuple[str, str, bool]] = []
    for term in filter(None, text.split(",")):
        if "!=" in term:
            path, value = term.split("!=", 1)
            terms.append((path, value, False))
        else:
            path, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            terms.append((path, value, True))
    return lambda obj: all((_field(obj, path) == value) == equal for path, value, equal in terms)


def _flag(value: str | None) -> bool:
    """A boolean query parameter as the API server reads it (Go's strconv.ParseBool)."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


class FakeApiServer:
    def __init__(self) -> None:
        self.resource_version = 0
        self.objects: dict[str, dict[tuple[str, str], Object]] = {plural: {} for plural in RESOURCES}
        self.history: dict[str, list[_Event]] = {plural: [] for plural in RESOURCES}
        self.compacted = 0  # a watch from a version older than this gets 410 Gone
        self.watchers: list[_Watcher] = []
        self.failures: list[int] = []  # statuses the next requests get instead of an answer
        self.requests: list[str] = []  # "GET /api/v1/pods?watch=true&...", in order: tests assert on them
        self.status_patches: list[tuple[str, str, str, Object]] = []  # (plural, namespace, name, patch)
        self.forbid_status_patches = False  # answer 403, as an API server whose RBAC does not allow it
        self.watch_events_sent = 0
        self._runner: web.AppRunner | None = None

    # Control, from tests.
    def put(self, plural: str, obj: Object) -> Object:
        """Create or replace an object (generation moves when its spec does); emits ADDED or MODIFIED."""
        obj = copy.deepcopy(obj)
        resource = RESOURCES[plural]
        obj.setdefault("apiVersion", resource.api_version)
        obj.setdefault("kind", resource.kind)
        metadata = obj.setdefault("metadata", {})
        if not resource.namespaced:
            metadata.pop("namespace", None)
        key = _key(obj)
        old = self.objects[plural].get(key)
        metadata["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        generation = old["metadata"].get("generation", 1) if old else 1
        if old and old.get("spec") != obj.get("spec"):
            generation += 1
        metadata["generation"] = generation
        if old and "status" in old and "status" not in obj:
            obj["status"] = old["status"]
        self._emit(plural, "MODIFIED" if old else "ADDED", obj)
        return obj

    def delete(self, plural: str, name: str, namespace: str = "") -> None:
        obj = self.objects[plural][(namespace, name)]
        self._emit(plural, "DELETED", copy.deepcopy(obj))

    def compact(self) -> None:
        """Forget the history so far: a watch resuming from an older version gets 410 Gone."""
        self.compacted = self.resource_version + 1
        for events in self.history.values():
            events.clear()

    def drop_watches(self) -> None:
        """End every open watch stream, as an API server restart or a load balancer would."""
        for watcher in self.watchers:
            watcher.queue.put_nowait(None)

    def bookmark(self) -> None:
        """A BOOKMARK to every open watch: the current version, nothing changed."""
        for watcher in self.watchers:
            resource = watcher.resource
            obj = {
                "apiVersion": resource.api_version,
                "kind": resource.kind,
                "metadata": {"resourceVersion": str(self.resource_version)},
            }
            watcher.queue.put_nowait(_Event(self.resource_version, "BOOKMARK", obj))

    def fail_next(self, *statuses: int) -> None:
        self.failures.extend(statuses)

    def watching(self, plural: str) -> int:
        return sum(1 for watcher in self.watchers if watcher.resource.plural == plural)

    def _emit(self, plural: str, event_type: str, obj: Object) -> None:
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        if event_type == "DELETED":
            del self.objects[plural][_key(obj)]
        else:
            self.objects[plural][_key(obj)] = obj
        event = _Event(self.resource_version, event_type, copy.deepcopy(obj))
        self.history[plural].append(event)
        for watcher in self.watchers:
            if watcher.resource.plural == plural and self._selected(watcher, obj):
                watcher.queue.put_nowait(event)

    @staticmethod
    def _selected(watcher: _Watcher, obj: Object) -> bool:
        namespace_matches = watcher.namespace is None or obj["metadata"].get("namespace") == watcher.namespace
        return namespace_matches and watcher.matches(obj)

    # HTTP
    def app(self) -> web.Application:
        app = web.Application()
        for resource in RESOURCES.values():
            collection = f"{resource.prefix}/{resource.plural}"
            app.router.add_get(collection, self._collection)
            if resource.namespaced:
                app.router.add_get(f"{resource.prefix}/namespaces/{{namespace}}/{resource.plural}", self._collection)
                app.router.add_patch(
                    f"{resource.prefix}/namespaces/{{namespace}}/{resource.plural}/{{name}}/status", self._patch_status
                )
            else:
                app.router.add_patch(f"{collection}/{{name}}/status", self._patch_status)
        return app

    async def start(self, sock: socket.socket | None = None) -> str:
        """Serve on `sock` (bound and listening, e.g. in a lab's node namespace) or on a loopback port;
        returns the URL. Called again, it serves the same cluster on one more socket (another node's)."""
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
        if self._runner is None:
            self._runner = web.AppRunner(self.app(), shutdown_timeout=0.5)
            await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            async with asyncio.timeout(10):
                await self._runner.cleanup()

    def _resource_of(self, request: web.Request) -> Resource:
        return RESOURCES[request.path.rstrip("/").split("/")[-1 if "name" not in request.match_info else -3]]

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path_qs)
        if self.failures:
            status = self.failures.pop(0)
            return web.json_response(_status(status, "injected failure"), status=status)
        resource = self._resource_of(request)
        namespace = request.match_info.get("namespace")
        matches = field_selector(request.query.get("fieldSelector", ""))
        if _flag(request.query.get("watch")):
            return await self._watch(request, _Watcher(resource, namespace, matches))
        items = [
            obj
            for obj in self.objects[resource.plural].values()
            if (namespace is None or obj["metadata"].get("namespace") == namespace) and matches(obj)
        ]
        return web.json_response(
            {
                "apiVersion": resource.api_version,
                "kind": f"{resource.kind}List",
                "metadata": {"resourceVersion": str(self.resource_version)},
                "items": sorted(items, key=_key),
            }
        )

    async def _watch(self, request: web.Request, watcher: _Watcher) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        since = int(request.query.get("resourceVersion") or self.resource_version)
        if since < self.compacted - 1:
            gone = _status(410, f"too old resource version: {since} ({self.compacted - 1})", reason="Expired")
            await self._send(response, _Event(self.resource_version, "ERROR", gone))
            return response
        timeout_s = float(request.query.get("timeoutSeconds", 1800))
        bookmarks = _flag(request.query.get("allowWatchBookmarks"))
        for event in self.history[watcher.resource.plural]:
            if event.resource_version > since and self._selected(watcher, event.object):
                watcher.queue.put_nowait(event)
        self.watchers.append(watcher)
        try:
            async with asyncio.timeout(timeout_s):
                while (queued := await watcher.queue.get()) is not None:
                    if queued.type != "BOOKMARK" or bookmarks:
                        await self._send(response, queued)
        except TimeoutError:
            pass
        except ConnectionResetError:
            return response
        finally:
            self.watchers.remove(watcher)
        return response

    async def _send(self, response: web.StreamResponse, event: _Event) -> None:
        self.watch_events_sent += 1
        await response.write(json.dumps({"type": event.type, "object": event.object}).encode() + b"\n")

    async def _patch_status(self, request: web.Request) -> web.Response:
        self.requests.append(f"PATCH {request.path_qs}")
        resource = self._resource_of(request)
        name, namespace = request.match_info["name"], request.match_info.get("namespace", "")
        if self.forbid_status_patches:
            return web.json_response(_status(403, f"{resource.plural}/status is forbidden"), status=403)
        if request.content_type != "application/merge-patch+json":
            return web.json_response(_status(415, f"unsupported patch type {request.content_type}"), status=415)
        obj = self.objects[resource.plural].get((namespace, name))
        if obj is None:
            return web.json_response(_status(404, f"{resource.plural} {name} not found"), status=404)
        patch = await request.json()
        self.status_patches.append((resource.plural, namespace, name, patch))
        # Only the status subresource changes; the spec and generation stay.
        updated = {**obj, "status": _merge_patch(obj.get("status", {}), patch.get("status", {}))}
        self._emit(resource.plural, "MODIFIED", copy.deepcopy(updated))
        return web.json_response(self.objects[resource.plural][(namespace, name)])


def _status(code: int, message: str, reason: str = "") -> Object:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip


# A lab's pods and policy files as the objects a Kubernetes cluster would hold.
def lab_objects(nodes: list[LabNode], pods: list[LabPod]) -> list[tuple[str, Object]]:
    """(plural, object) for the lab's nodes (an InternalIP per family), its namespaces and its pods, each on its
    node (external hosts are not pods; a pod's status has podIP and podIPs, IPv4 first, as a dual-stack cluster
    reports them)."""
    ipv6 = any(pod.ip6 for pod in pods)
    objects: list[tuple[str, Object]] = []
    for lab_node in nodes:
        addresses = [{"type": "InternalIP", "address": ip} for ip in lab_node.addresses(ipv6)]
        objects.append(("nodes", {"metadata": {"name": lab_node.name}, "status": {"addresses": addresses}}))
    for namespace in sorted({pod.namespace for pod in pods if not pod.external}):
        labels = {"kubernetes.io/metadata.name": namespace}
        objects.append(("namespaces", {"metadata": {"name": namespace, "labels": labels}}))
    for pod in pods:
        if pod.external:
            continue
        ports = [{"name": name, "containerPort": port, "protocol": proto} for name, port, proto in pod.named_ports]
        spec = {"nodeName": pod.node, "serviceAccountName": pod.service_account,
                "containers": [{"name": "main", "image": "lab", "ports": ports}]}  # fmt: skip
        metadata = {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels)}
        ips = [ip for ip in (pod.ip, pod.ip6) if ip]
        status = {"podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips], "phase": "Running"}
        objects.append(("pods", {"metadata": metadata, "spec": spec, "status": status}))
    return objects


def policy_objects(directory: Path) -> list[tuple[str, Object]]:
    """(plural, object) for every CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy in a policy directory
    (what `kubectl apply -f` would create)."""
    plurals = {resource.kind: plural for plural, resource in RESOURCES.items()}
    objects = []
    for path in policy_files(directory):
        for document in parse_documents(path.read_text()):
            obj = plain(document)
            if isinstance(obj, dict) and obj.get("kind") in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
                objects.append((plurals[obj["kind"]], obj))
    return objects


def lab_agent_options(url: str, devices: list[str]) -> tuple[str, ...]:
    """The agent arguments that take pods and policies from the API server at `url`; `devices`: the node's
    interfaces that are no pod's (external hosts, the fabric)."""
    return ("--source", "kubernetes", "--k8s-api-server", url, "--devices", ",".join(devices))


T = TypeVar("T")
APPLY_TIMEOUT_S = 15.0


class FakeApiInThread:
    """The fake API server on an event loop of its own (the lab's calls block), serving the cluster on a socket
    in each node's namespace, where that node's agent runs (a lab's PrepareAgent)."""

    def __init__(self) -> None:
        self.fake = FakeApiServer()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-apiserver", daemon=True)
        self.thread.start()

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the server's loop (its state is that loop's) and return its result."""

        async def run() -> T:
            return function()

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(timeout=10)

    def prepare_agent(self, lab: Lab, node: LabNode, pods: list[LabPod]) -> tuple[str, ...]:
        """For each node: the cluster served on a socket in its namespace, where its agent runs."""
        listener = tcp_listener_in_netns(node.netns, "127.0.0.1")
        url = asyncio.run_coroutine_threadsafe(self.fake.start(listener), self.loop).result(timeout=10)
        if not self.call(lambda: self.fake.objects["nodes"]):
            # The cluster holds the lab's nodes and pods and, as `kubectl apply` would have made them, its
            # policy files.
            objects = [*lab_objects(lab.nodes(), pods), *policy_objects(lab.policies_dir)]
            self.call(lambda: [self.fake.put(plural, obj) for plural, obj in objects])
        return lab_agent_options(url, lab.devices(node, pods))

    def apply(self, lab: Lab, directory: Path) -> list[str]:
        """`kubectl apply` of a policy directory, pruning what it no longer holds; returns once every node's agent
        enforces it."""
        before = {node.name: agent_status(node.agent_socket)["policies"]["digest"] for node in lab.nodes()}
        wanted = policy_objects(directory)

        def replace() -> None:
            names = {(plural, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]) for plural, obj in wanted}
            for plural in ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"):
                for namespace, name in list(self.fake.objects[plural]):
                    if (plural, namespace, name) not in names:
                        self.fake.delete(plural, name, namespace)
            for plural, obj in wanted:
                self.fake.put(plural, obj)

        self.call(replace)
        wait_for(lambda: _enforced_after(lab, before), APPLY_TIMEOUT_S, "every agent to enforce the applied policies")
        return []

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _enforced_after(lab: Lab, digests: dict[str, str]) -> bool:
    """Every node's agent is ready with policies other than `digests` (node name -> digest)."""
    for node in lab.nodes():
        status = agent_status(node.agent_socket)
        if not status["ready"] or status["policies"]["digest"] == digests[node.name]:
            return False
    return True
