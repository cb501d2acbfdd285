"""Churn across nodes (issue 15): an address that changes hands, nodes that come and go, as the API server says.

A two-node lab in Kubernetes mode (one fake API server, an agent per node). The server on node-1 admits only
`trusted`, on node-2. `trusted` is deleted and its address given to `stranger`, another pod with other labels
(in the lab the same namespace keeps the address, as a CNI reusing it would): every node moves the address to
the new identity when the event arrives, and from then on nothing from that address is allowed by the old
identity, neither a new connection nor one opened before.
"""

import json
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from sidecarless.api.client import agent_get
from sidecarless.lab.fake_apiserver import FakeApiInThread
from sidecarless.lab.node import Lab
from tests.e2e.conftest import lab_name, wait_until, write_policy

PODS = """
pods:
  - name: server
    namespace: shop
    labels: {app: server}
    node: node-1
    serve: [{port: 8080, protocol: http}, {port: 9000, protocol: tcp}]
  - {name: trusted, namespace: shop, labels: {app: trusted}, node: node-2}
  - {name: bystander, namespace: shop, labels: {app: bystander}, node: node-2}
"""
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: trusted}}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "9000", protocol: TCP}]}]
"""


@pytest.fixture(scope="module")
def churn_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, FakeApiInThread]]:
    directory = tmp_path_factory.mktemp("churn")
    (directory / "pods.yaml").write_text(PODS)
    write_policy(directory / "policies", "server.yaml", POLICY)
    api = FakeApiInThread()
    lab = Lab(lab_name("churn"))
    try:
        lab.up(directory / "pods.yaml", directory / "policies", prepare_agent=api.prepare_agent)
        yield lab, api
    finally:
        lab.down()
        api.close()


def ipcache(lab: Lab, node: str) -> dict[str, int]:
    """A node's kernel ipcache, prefix -> identity (`bpf ipcache list`)."""
    status, body = agent_get(lab.node(node).agent_socket, "/v1/bpf/ipcache", timeout_s=5)
    assert status == 200, body
    return {row["prefix"]: row["identity"] for row in json.loads(body)}


def get(lab: Lab, source: str) -> str:
    command = ["curl", "-s", "-4", "-o", "/dev/null", "-w", "%{http_code}", "--connect-timeout", "1.5",
               "--max-time", "3", "http://server.shop:8080/"]  # fmt: skip
    result = subprocess.run(lab.exec_command(source, command), capture_output=True, text=True, timeout=30)
    return "dropped" if result.returncode == 28 else result.stdout


class OpenConnection:
    """A TCP connection to the server's echo, held open: each line sent comes back while the flow is allowed."""

    def __init__(self, lab: Lab, source: str) -> None:
        command = lab.exec_command(source, ["nc", "-4", "server.shop", "9000"])
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def echoes(self, line: str, timeout_s: float = 2.0) -> bool:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                return False
        return self.process.stdout.readline().strip() == line

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


def test_an_address_reused_by_another_pod_takes_its_new_identity_on_every_node(
    churn_lab: tuple[Lab, FakeApiInThread],
) -> None:
    lab, api = churn_lab
    trusted = lab.find_pod("trusted")
    prefixes = [f"{trusted.ip}/32", f"{trusted.ip6}/128"]
    assert get(lab, "trusted") == "200" and get(lab, "bystander") == "dropped"
    old = ipcache(lab, "node-1")[prefixes[0]]
    connection = OpenConnection(lab, "trusted")
    try:
        assert connection.echoes("before")
        pod = api.call(lambda: dict(api.fake.objects["pods"][("shop", "trusted")]))
        stranger = {**pod, "metadata": {**pod["metadata"], "name": "stranger", "labels": {"app": "stranger"}}}

        def reuse() -> None:
            api.fake.delete("pods", "trusted", "shop")
            api.fake.put("pods", stranger)

        since = time.monotonic()
        api.call(reuse)
        moved: dict[str, float] = {}

        def every_node_moved() -> bool:
            for node in ("node-1", "node-2"):
                if node not in moved and all(ipcache(lab, node).get(p, old) != old for p in prefixes):
                    moved[node] = time.monotonic() - since
            return len(moved) == 2

        wait_until(every_node_moved, "every node's ipcache to move the address", timeout_s=10)
        print(f"API event -> each node's kernel ipcache: { {n: f'{s * 1000:.0f} ms' for n, s in moved.items()} }")
        new = ipcache(lab, "node-1")[prefixes[0]]
        assert new != old and ipcache(lab, "node-1")[prefixes[1]] == new == ipcache(lab, "node-2")[prefixes[0]]
        # From now on the old identity allows nothing: the open connection is cut on its next packet, a new
        # one is dropped, over both families.
        assert not connection.echoes("after")
    finally:
        connection.close()
    assert get(lab, "trusted") == "dropped"
    command = lab.exec_command("trusted", ["curl", "-s", "-6", "--connect-timeout", "1.5", "http://server.shop:8080/"])
    assert subprocess.run(command, capture_output=True, timeout=30).returncode == 28
    # And back: the address is trusted's again.
    api.call(lambda: (api.fake.delete("pods", "stranger", "shop"), api.fake.put("pods", pod)))
    wait_until(lambda: get(lab, "trusted") == "200", "trusted allowed again")


def test_a_node_added_and_removed_brings_and_takes_its_pods_identities(
    churn_lab: tuple[Lab, FakeApiInThread],
) -> None:
    """Another node (no lab namespace: only the API knows it) joins with a pod, then leaves: on both lab nodes
    its address appears as remote-node and its pod's address with the pod's identity, then both disappear."""
    lab, api = churn_lab
    node = {"metadata": {"name": "node-3"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.244.0.3"}]}}
    pod = {
        "metadata": {"name": "visitor", "namespace": "shop", "labels": {"app": "trusted"}},
        "spec": {
            "nodeName": "node-3",
            "serviceAccountName": "default",
            "containers": [{"name": "main", "image": "lab"}],
        },
        "status": {"podIP": "10.244.3.10", "podIPs": [{"ip": "10.244.3.10"}], "phase": "Running"},
    }
    trusted_identity = ipcache(lab, "node-1")[f"{lab.find_pod('trusted').ip}/32"]
    api.call(lambda: (api.fake.put("nodes", node), api.fake.put("pods", pod)))
    for name in ("node-1", "node-2"):
        wait_until(
            lambda name=name: (
                ipcache(lab, name).get("10.244.0.3/32") == 6
                and ipcache(lab, name).get("10.244.3.10/32") == trusted_identity
            ),
            f"node-3 and its pod in {name}'s ipcache",
        )
    api.call(lambda: (api.fake.delete("pods", "visitor", "shop"), api.fake.delete("nodes", "node-3")))
    for name in ("node-1", "node-2"):
        wait_until(
            lambda name=name: not {"10.244.0.3/32", "10.244.3.10/32"} & set(ipcache(lab, name)),
            f"node-3 and its pod gone from {name}'s ipcache",
        )


def test_bpf_ipcache_list_names_pods_of_both_nodes(churn_lab: tuple[Lab, FakeApiInThread]) -> None:
    lab, _ = churn_lab
    result = subprocess.run(
        [sys.executable, "-m", "sidecarless", "bpf", "ipcache", "list", "--lab", lab.name, "--node", "node-2", "-o", "json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row["prefix"]: row for row in json.loads(result.stdout)}
    server, bystander = lab.find_pod("server"), lab.find_pod("bystander")
    assert rows[f"{server.ip}/32"]["pod"] == "shop/server"  # another node's
    assert rows[f"{bystander.ip6}/128"]["pod"] == "shop/bystander"  # this node's
    assert rows["10.244.0.1/32"]["identity"] == 6 and rows["10.244.0.2/32"]["identity"] == 1
