"""The Kubernetes source's real client code (sources/kubernetes_api.py, aiohttp) against the fake API server: list, watch,
resume, 410 relist, bookmarks, backoff, status reporting."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sidecarless.lab.fake_apiserver import FakeApiServer
from sidecarless.sources import kubernetes
from sidecarless.sources.kubernetes import KubernetesConfig, KubernetesSource
from sidecarless.sources.source import NodeState, PolicySet

NODE = "node-a"


def cnp(name: str, path: str, namespace: str = "production", **extra: Any) -> dict[str, Any]:
    rule = {"method": "GET", "path": path, **extra}
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "billing-api"}},
            "ingress": [{"toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"http": [rule]}}]}],
        },
    }


def pod(name: str, ip: str, node: str = NODE, namespace: str = "production", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "sa",
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
            **spec,
        },
        "status": {"podIP": ip, "phase": "Running"},
    }


class Harness:
    """The source running, its updates folded into the latest policy set and node state."""

    def __init__(self, fake: FakeApiServer, source: KubernetesSource) -> None:
        self.fake, self.source = fake, source
        self.policy_set: PolicySet | None = None
        self.node: NodeState | None = None
        self.updates = 0

    async def consume(self) -> None:
        async for update in self.source.updates():
            self.updates += 1
            self.policy_set = update.policy_set or self.policy_set
            self.node = update.node or self.node

    def rules(self) -> list[str]:
        """Each accepted policy's first HTTP path, by policy key."""
        assert self.policy_set is not None
        return sorted(
            f"{p.key}={p.rules[0].ingress[0].to_ports[0].http[0].path}"  # type: ignore[index,union-attr]
            for p in self.policy_set.policies
        )

    async def until(self, condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status {self.source.status()}")
            await asyncio.sleep(0.01)


@pytest.fixture
async def cluster() -> AsyncIterator[Harness]:
    fake = FakeApiServer()
    fake.put("namespaces", {"metadata": {"name": "production", "labels": {"team": "billing"}}})
    fake.put(
        "nodes", {"metadata": {"name": NODE}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}
    )
    fake.put("pods", pod("billing-api", "10.1.0.2"))
    fake.put("pods", pod("prometheus", "10.2.0.7", node="node-b"))
    fake.put("pods", pod("node-exporter", "10.0.0.1", hostNetwork=True))
    fake.put("ciliumnetworkpolicies", cnp("api", "/metrics"))
    url = await fake.start()
    routes = {"10.1.0.2": "lxc-billing", "10.1.0.5": "lxc-dual"}
    source = KubernetesSource(
        KubernetesConfig(node_name=NODE, api_server=url), lambda ips: {ip: routes[ip] for ip in ips if ip in routes}
    )
    harness = Harness(fake, source)
    harness.routes = routes  # type: ignore[attr-defined]
    task = asyncio.create_task(harness.consume())
    try:
        await harness.until(lambda: harness.policy_set is not None and harness.node is not None, "first update")
        await harness.until(lambda: len(fake.watchers) == len(source.reflectors), "every watch open")
        yield harness
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done, f"the source did not stop when cancelled: {task.get_stack()}"
        async with asyncio.timeout(10):
            await fake.stop()


async def test_first_update_holds_policies_local_and_remote_pods(cluster: Harness) -> None:
    assert cluster.rules() == ["production/api=/metrics"]
    assert cluster.node is not None
    endpoints = {e.key: e for e in cluster.node.endpoints}
    assert set(endpoints) == {"production/billing-api", "production/prometheus"}  # not the host-network pod
    local, remote = endpoints["production/billing-api"], endpoints["production/prometheus"]
    assert (local.local, local.interface, local.ip) == (True, "lxc-billing", "10.1.0.2")
    assert (remote.local, remote.interface) == (False, "")
    assert ("io.cilium.k8s.namespace.labels.team", "billing") in local.labels
    assert local.service_account == "sa" and local.named_ports[0].port == 8080
    assert cluster.node.node.ips == ("10.0.0.1",)
    await cluster.until(lambda: cluster.fake.watching("pods") == 2, "pods watched")
    watches = [r for r in cluster.fake.requests if "watch=true" in r and "/pods" in r]
    assert any("fieldSelector=spec.nodeName%3Dnode-a" in r for r in watches), watches
    assert any("fieldSelector=spec.nodeName!%3Dnode-a" in r for r in watches), watches


async def test_policy_added_changed_deleted(cluster: Harness) -> None:
    cluster.fake.put("ciliumnetworkpolicies", cnp("extra", "/healthz"))
    await cluster.until(lambda: "production/extra=/healthz" in cluster.rules(), "added")
    cluster.fake.put("ciliumnetworkpolicies", cnp("extra", "/ready"))
    await cluster.until(lambda: "production/extra=/ready" in cluster.rules(), "changed")
    cluster.fake.delete("ciliumnetworkpolicies", "extra", "production")
    await cluster.until(lambda: cluster.rules() == ["production/api=/metrics"], "deleted")


async def test_a_policy_change_reads_and_reports_only_the_changed_policy(
    cluster: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: each change turned all 20,000 policy objects into documents again, hashed them all and checked
    every status (80 ms of the 220 ms from change to enforced)."""
    for index in range(50):
        cluster.fake.put("ciliumnetworkpolicies", cnp(f"p{index}", f"/p{index}"))
    await cluster.until(lambda: len(cluster.rules()) == 51, "50 more policies")
    await cluster.until(lambda: len(cluster.fake.status_patches) == 51, "their statuses")
    policies = cluster.source.reflectors["CiliumNetworkPolicy"]
    await cluster.until(
        lambda: policies.resource_version == str(cluster.fake.resource_version) and not policies.dirty,
        "the statuses seen and taken",
    )
    read: list[str] = []
    statuses_checked: list[str] = []
    policy_bytes, write_status = kubernetes.policy_bytes, cluster.source._write_status

    def reading(kind: str, obj: dict[str, Any]) -> bytes:
        read.append(obj["metadata"]["name"])
        return policy_bytes(kind, obj)

    async def checking(kind: str, obj: dict[str, Any], *rest: Any) -> bool:
        statuses_checked.append(obj["metadata"]["name"])
        return await write_status(kind, obj, *rest)

    monkeypatch.setattr(kubernetes, "policy_bytes", reading)
    monkeypatch.setattr(cluster.source, "_write_status", checking)
    cluster.fake.put("ciliumnetworkpolicies", cnp("p7", "/changed"))
    await cluster.until(lambda: "production/p7=/changed" in cluster.rules(), "the change")
    await cluster.until(lambda: statuses_checked == ["p7"], "its status checked")
    assert read == ["p7"]
    # A rejected version: the status of that policy alone is written.
    bad = cnp("p8", "/x")
    bad["spec"]["bogus"] = 1
    cluster.fake.put("ciliumnetworkpolicies", bad)
    await cluster.until(lambda: len(cluster.fake.status_patches) == 52, "the rejection in its status")
    assert cluster.fake.status_patches[-1][2] == "p8"
    assert "p8" in read and set(read) <= {"p7", "p8"}


async def test_reconnect_after_a_dropped_watch_loses_no_event(cluster: Harness) -> None:
    policies = cluster.source.reflectors["CiliumNetworkPolicy"]
    lists_before = policies.lists
    cluster.fake.drop_watches()
    # Changes while no watch is open (the event loop does not run between these lines).
    cluster.fake.put("ciliumnetworkpolicies", cnp("a", "/a"))
    cluster.fake.put("ciliumnetworkpolicies", cnp("b", "/b"))
    cluster.fake.delete("ciliumnetworkpolicies", "api", "production")
    await cluster.until(lambda: cluster.rules() == ["production/a=/a", "production/b=/b"], "the missed events")
    assert policies.lists == lists_before, "resumed from its resourceVersion, no relist needed"
    assert policies.resumes >= 1


async def test_relist_after_410_loses_no_event(cluster: Harness) -> None:
    policies = cluster.source.reflectors["CiliumNetworkPolicy"]
    lists_before = policies.lists
    cluster.fake.drop_watches()
    cluster.fake.put("ciliumnetworkpolicies", cnp("a", "/a"))
    cluster.fake.delete("ciliumnetworkpolicies", "api", "production")
    cluster.fake.delete("pods", "billing-api", "production")
    cluster.fake.compact()  # the history the watch would resume from is gone: 410
    await cluster.until(lambda: cluster.rules() == ["production/a=/a"], "the relisted state")
    await cluster.until(lambda: cluster.node is not None and len(cluster.node.endpoints) == 1, "the deleted pod gone")
    assert policies.lists == lists_before + 1


async def test_bookmarks_move_the_resource_version(cluster: Harness) -> None:
    policies = cluster.source.reflectors["CiliumNetworkPolicy"]

    def status_seen() -> bool:
        stored = cluster.fake.objects["ciliumnetworkpolicies"][("production", "api")]
        return "status" in stored and policies.resource_version == stored["metadata"]["resourceVersion"]

    await cluster.until(status_seen, "the agent's status on the policy seen")  # it moves the policies' version
    cluster.fake.put("pods", pod("other", "10.2.0.9", node="node-b"))  # moves the version, not the policies'
    await cluster.until(
        lambda: cluster.node is not None and "production/other" in {e.key for e in cluster.node.endpoints}, "the pod"
    )
    assert int(policies.resource_version) < cluster.fake.resource_version
    updates = cluster.updates
    cluster.fake.bookmark()
    await cluster.until(lambda: policies.resource_version == str(cluster.fake.resource_version), "the bookmark")
    assert cluster.updates == updates  # a bookmark changes nothing
    # Resuming from the bookmark's version needs no relist even after the history is compacted.
    lists_before = policies.lists
    cluster.fake.compact()
    cluster.fake.drop_watches()
    cluster.fake.put("ciliumnetworkpolicies", cnp("a", "/a"))
    await cluster.until(lambda: "production/a=/a" in cluster.rules(), "the new policy")
    assert policies.lists == lists_before


async def test_errors_back_off_and_recover(cluster: Harness) -> None:
    policies = cluster.source.reflectors["CiliumNetworkPolicy"]
    errors_before = policies.errors
    cluster.fake.fail_next(*[500] * 18)  # the next reconnects of every watch fail, a few times over
    cluster.fake.drop_watches()
    cluster.fake.put("ciliumnetworkpolicies", cnp("a", "/a"))
    await cluster.until(lambda: "production/a=/a" in cluster.rules(), "recovery", timeout_s=10)
    assert not cluster.fake.failures
    assert sum(r.errors for r in cluster.source.reflectors.values()) >= 18 - errors_before
    assert "HTTP 500" in " ".join(r.last_error for r in cluster.source.reflectors.values())


async def test_rejected_policy_keeps_the_last_good_and_says_so_in_its_status(cluster: Harness) -> None:
    await cluster.until(lambda: len(cluster.fake.status_patches) == 1, "the first status")
    assert cluster.fake.status_patches[0][3] == {"status": {"nodes": {NODE: {
        "ok": True, "enforcing": True, "lastUpdated": cluster.fake.status_patches[0][3]["status"]["nodes"][NODE]["lastUpdated"]
    }}}}  # fmt: skip
    bad = cnp("api", "/changed")
    bad["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["pathx"] = "/typo"
    cluster.fake.put("ciliumnetworkpolicies", bad)
    await cluster.until(lambda: len(cluster.fake.status_patches) == 2, "the rejection in the status")
    entry = cluster.fake.status_patches[1][3]["status"]["nodes"][NODE]
    assert entry["ok"] is False and "pathx" in entry["error"] and "CiliumNetworkPolicy production/api" in entry["error"]
    assert cluster.rules() == ["production/api=/metrics"]  # the last good version stays in force
    assert cluster.policy_set is not None
    assert list(cluster.policy_set.rejected) == ["CiliumNetworkPolicy production/api"]
    stored = cluster.fake.objects["ciliumnetworkpolicies"][("production", "api")]
    assert stored["status"]["nodes"][NODE]["ok"] is False
    # Fixed: accepted, and the status says so.
    cluster.fake.put("ciliumnetworkpolicies", cnp("api", "/fixed"))
    await cluster.until(lambda: cluster.rules() == ["production/api=/fixed"], "the fixed version")
    await cluster.until(lambda: len(cluster.fake.status_patches) == 3, "ok again")
    assert cluster.fake.status_patches[2][3]["status"]["nodes"][NODE]["ok"] is True


async def test_without_rbac_for_status_the_policy_still_applies(cluster: Harness) -> None:
    cluster.fake.forbid_status_patches = True
    bad = cnp("api", "/x")
    bad["spec"]["bogus"] = 1
    cluster.fake.put("ciliumnetworkpolicies", bad)
    await cluster.until(lambda: cluster.source.status_forbidden, "the 403")
    cluster.fake.put("ciliumnetworkpolicies", cnp("b", "/b"))
    await cluster.until(lambda: "production/b=/b" in cluster.rules(), "the next policy")


async def test_a_pod_waits_for_its_route(cluster: Harness) -> None:
    cluster.fake.put("pods", pod("new", "10.1.0.3"))
    await cluster.until(lambda: cluster.source.pods_without_interface == ["production/new"], "the pod seen")
    assert cluster.node is not None and "production/new" not in {e.key for e in cluster.node.endpoints}
    cluster.routes["10.1.0.3"] = "lxc-new"  # type: ignore[attr-defined]
    await cluster.until(
        lambda: cluster.node is not None and "production/new" in {e.key for e in cluster.node.endpoints},
        "the pod once its route is there",
    )


async def test_namespace_labels_follow_the_namespace(cluster: Harness) -> None:
    namespace = copy.deepcopy(cluster.fake.objects["namespaces"][("", "production")])
    namespace["metadata"]["labels"] = {"team": "payments"}
    cluster.fake.put("namespaces", namespace)

    def relabelled() -> bool:
        assert cluster.node is not None
        local = next(e for e in cluster.node.endpoints if e.name == "billing-api")
        return ("io.cilium.k8s.namespace.labels.team", "payments") in local.labels

    await cluster.until(relabelled, "the namespace's new labels on its pods")


async def test_dual_stack_pods_carry_both_addresses(cluster: Harness) -> None:
    """`status.podIPs` gives both families (the primary `podIP` first, either family); a pod of one family
    keeps that one. The pod is routed, and found, by its IPv4 address where it has one."""
    dual = pod("dual", "fd00:10:1::5")
    dual["status"]["podIPs"] = [{"ip": "fd00:10:1::5"}, {"ip": "10.1.0.5"}]
    cluster.fake.put("pods", dual)
    cluster.fake.put("pods", pod("only-six", "fd00:10:1::6", node="node-b"))
    await cluster.until(
        lambda: (
            cluster.node is not None
            and {"production/dual", "production/only-six"} <= {e.key for e in cluster.node.endpoints}
        ),
        "both pods",
    )
    assert cluster.node is not None
    endpoints = {e.key: e for e in cluster.node.endpoints}
    assert (endpoints["production/dual"].ip, endpoints["production/dual"].ip6) == ("10.1.0.5", "fd00:10:1::5")
    assert endpoints["production/dual"].interface == "lxc-dual"
    assert (endpoints["production/only-six"].ip, endpoints["production/only-six"].ip6) == ("", "fd00:10:1::6")


async def test_other_nodes_are_remote_nodes(cluster: Harness) -> None:
    """Every node is listed: this node's addresses are the host, the others' (both families) remote-node, and a
    node that joins or leaves the cluster joins or leaves that set (issue 15)."""
    assert cluster.node is not None and cluster.node.node.remote_ips == ()
    addresses = [{"type": "InternalIP", "address": "10.0.0.2"}, {"type": "InternalIP", "address": "fd00::2"}]
    cluster.fake.put("nodes", {"metadata": {"name": "node-b"}, "status": {"addresses": addresses}})
    await cluster.until(
        lambda: cluster.node is not None and cluster.node.node.remote_ips == ("10.0.0.2", "fd00::2"), "node-b"
    )
    assert cluster.node.node.ips == ("10.0.0.1",)
    cluster.fake.delete("nodes", "node-b")
    await cluster.until(lambda: cluster.node is not None and cluster.node.node.remote_ips == (), "node-b gone")
