"""Several nodes (issue 15): the verdict does not depend on where pods run.

Each verdict table runs again with its pods spread over two nodes of a lab (each with its own agent, Envoy and
datapath, joined by a fabric with native routing): the source pod's node enforces its egress, the destination
pod's node its ingress, and the same table passes.
"""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecarless.api.client import agent_get, agent_status
from sidecarless.lab.fake_apiserver import FakeApiInThread
from sidecarless.lab.node import Lab
from sidecarless.lab.scenario import Outcome, run_scenario, run_scenarios_in_one_lab, spread_scenario
from sidecarless.lab.topology import LabPod
from tests.e2e.conftest import BILLING, assert_ran_in_both_families, lab_name, wait_until, write_policy
from tests.e2e.test_conformance import SCENARIOS as CILIUM_SCENARIOS
from tests.e2e.test_conformance import SUITE as CILIUM_SUITE
from tests.e2e.test_hostile_pod import RAWPOD, mac_of, watching
from tests.e2e.test_observability import Monitor
from tests.e2e.test_policy_sections import SCENARIOS as SECTIONS_DIR
from tests.e2e.test_policy_sections import SECTIONS

# Cilium's own layout (cilium-cli deploy()): client, client2 and echo-same-node share a node; client3 and
# echo-other-node run on another. Every client reaches both echoes, so its flows cross nodes both ways.
CILIUM_NODES = {
    "cilium-test/client": "node-1",
    "cilium-test/client2": "node-1",
    "cilium-test/echo-same-node": "node-1",
    "cilium-test/client3": "node-2",
    "cilium-test/echo-other-node": "node-2",
}


def crossing(outcomes: list[Outcome], nodes: dict[str, str]) -> list[str]:
    """The cases whose two ends are on different nodes."""

    def node_of(reference: str) -> str | None:
        return next((node for key, node in nodes.items() if reference in (key, key.rpartition("/")[2])), None)

    crossed = []
    for outcome in outcomes:
        source, destination = node_of(outcome.case.source), node_of(outcome.case.destination)
        if source and destination and source != destination:
            crossed.append(outcome.case.id)
    return crossed


@pytest.fixture(scope="module")
def sections_over_two_nodes() -> tuple[dict[Path, list[Outcome]], dict[str, str], list[str]]:
    """Every section's table in one two-node lab (they share one pod file), its policies applied in turn."""
    directories = [SECTIONS_DIR / section for section in SECTIONS]
    nodes = spread_scenario(directories, 2)
    lines: list[str] = []
    return run_scenarios_in_one_lab(directories, lab_name("2n"), lines.append, nodes), nodes, lines


@pytest.mark.parametrize("section", SECTIONS)
def test_policy_section_over_two_nodes(
    section: str, sections_over_two_nodes: tuple[dict[Path, list[Outcome]], dict[str, str], list[str]]
) -> None:
    results, nodes, lines = sections_over_two_nodes
    outcomes = results[SECTIONS_DIR / section]
    assert outcomes and all(outcome.passed for outcome in outcomes), "\n".join(lines)
    assert_ran_in_both_families(outcomes)
    crossed = crossing(outcomes, nodes)
    assert len(crossed) * 2 >= len(outcomes), f"only {len(crossed)} of {len(outcomes)} cases crossed nodes"


@pytest.fixture(scope="module")
def cilium_suite_across_nodes() -> tuple[dict[Path, list[Outcome]], list[str]]:
    """The suite's scenarios in one two-node lab in Cilium's layout, each one's policies applied in turn."""
    lines: list[str] = []
    directories = [CILIUM_SUITE / scenario for scenario in CILIUM_SCENARIOS]
    return run_scenarios_in_one_lab(directories, lab_name("2c"), lines.append, CILIUM_NODES), lines


@pytest.mark.parametrize("scenario", CILIUM_SCENARIOS)
def test_cilium_connectivity_across_nodes(
    scenario: str, cilium_suite_across_nodes: tuple[dict[Path, list[Outcome]], list[str]]
) -> None:
    results, lines = cilium_suite_across_nodes
    outcomes = results[CILIUM_SUITE / scenario]
    assert outcomes and all(outcome.passed for outcome in outcomes), "\n".join(lines)
    assert_ran_in_both_families(outcomes)
    crossed = crossing(outcomes, CILIUM_NODES)
    # Both directions: from node-1 to node-2 and back.
    sources = {CILIUM_NODES[f"cilium-test/{o.case.source}"] for o in outcomes if o.case.id in crossed}
    assert sources == {"node-1", "node-2"}, "\n".join(lines)


EGRESS = SECTIONS_DIR / "egress"
# The egress table's world over two nodes: the client's egress L7 at node-1, the api's ingress L7 at node-2.
PLACED = {
    "shop/client": "node-1",
    "shop/batch": "node-1",
    "ops/monitor": "node-1",
    "partner": "node-1",
    "shop/api": "node-2",
    "shop/web": "node-2",
    "internet": "node-2",
}
# Requests through the client's egress chain and the api's ingress chain (each Envoy keeps its upstream
# connections open: connections would not count each request).
EGRESS_REQUESTS = "http.egress_shop_client.downstream_rq_total"
INGRESS_REQUESTS = "http.ingress_shop_api.downstream_rq_total"


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Lab]:
    lab = Lab(lab_name("nodes"))
    try:
        lab.up(EGRESS / "pods.yaml", EGRESS / "policies", nodes=PLACED)
        yield lab
    finally:
        lab.down()


def request(lab: Lab, source: str, path: str, family: int) -> tuple[str, dict[str, Any] | None]:
    """(status or "dropped", what the backend received) for GET api:8080`path`."""
    command = ["curl", "-sS", f"-{family}", "--connect-timeout", "1.5", "--max-time", "5", "-w", "\n%{http_code}",
               f"http://api.shop:8080{path}"]  # fmt: skip
    result = subprocess.run(lab.exec_command(source, command), capture_output=True, text=True, timeout=30)
    body, _, code = result.stdout.rpartition("\n")
    if result.returncode == 28:
        return "dropped", None
    return code, json.loads(body) if code == "200" else None


def requests(lab: Lab) -> dict[str, tuple[int, int]]:
    """(egress, ingress) requests in each node's Envoy."""
    return {
        node: (lab.envoy_stat(EGRESS_REQUESTS, node), lab.envoy_stat(INGRESS_REQUESTS, node))
        for node in ("node-1", "node-2")
    }


def delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {node: (after[node][0] - before[node][0], after[node][1] - before[node][1]) for node in before}


@pytest.mark.parametrize("family", [4, 6])
def test_egress_l7_at_the_source_node_and_ingress_l7_at_the_destination_each_envoy_once(
    two_nodes: Lab, family: int
) -> None:
    lab = two_nodes
    # Both rules allow: node-1's egress listener, then node-2's ingress listener, each once. The api's rule
    # allows the client's identity only: node-2 knew the client by its own address (node-1's Envoy connected
    # from it), from node-2's ipcache.
    before = requests(lab)
    status, received = request(lab, "client", "/public/ok", family)
    assert status == "200" and received is not None and received["server"] == "shop/api"
    assert delta(before, requests(lab)) == {"node-1": (1, 0), "node-2": (0, 1)}
    # The client's egress rule denies: node-1's Envoy answers, node-2's never sees it.
    before = requests(lab)
    assert request(lab, "client", "/private", family)[0] == "403"
    assert delta(before, requests(lab)) == {"node-1": (1, 0), "node-2": (0, 0)}
    # The api's ingress rule denies: node-1's egress listener forwards, node-2's ingress listener answers.
    before = requests(lab)
    assert request(lab, "client", "/public/other", family)[0] == "403"
    assert delta(before, requests(lab)) == {"node-1": (1, 0), "node-2": (0, 1)}
    # ops/monitor is no client of the shop namespace: the api's node drops it (L3, by the remote identity).
    assert request(lab, "monitor", "/public/ok", family)[0] == "dropped"


def test_each_nodes_monitor_shows_its_own_side_of_a_cross_node_flow(two_nodes: Lab) -> None:
    lab = two_nodes
    monitors = {node: Monitor(lab, "--node", node) for node in ("node-1", "node-2")}
    try:
        # Live when a request shows up in both (the monitor announces nothing itself).
        wait_until(
            lambda: (
                request(lab, "client", "/public/ok", 4)[0] == "200"
                and all(any(e["type"] == "l7" for _, e in m.events) for m in monitors.values())
            ),
            "both monitors to show requests",
        )
        for monitor in monitors.values():
            monitor.events.clear()
        assert request(lab, "client", "/private", 4)[0] == "403"  # egress L7, node-1
        assert request(lab, "client", "/public/other", 4)[0] == "403"  # ingress L7, node-2
        assert request(lab, "monitor", "/public/ok", 4)[0] == "dropped"  # ingress L3, node-2
        command = lab.exec_command("client", ["nc", "-4", "-N", "-w", "1", "api.shop", "5432"])
        assert subprocess.run(command, input="x\n", capture_output=True, text=True, timeout=30).stdout == ""
        wait_until(
            lambda: (
                any(e["type"] == "drop" for _, e in monitors["node-1"].events)
                and any(e["type"] == "drop" for _, e in monitors["node-2"].events)
                and sum(e["type"] == "l7" for _, e in monitors["node-2"].events) >= 1
                and sum(e["type"] == "l7" for _, e in monitors["node-1"].events) >= 2
            ),
            "each node's events",
        )
    finally:
        events = {node: [e for _, e in monitor.stop()] for node, monitor in monitors.items()}
    # What each node saw of the flows above (a late event of the readiness requests, GET /public/ok, aside).
    side: dict[str, set[tuple[object, ...]]] = {}
    for node, node_events in events.items():
        side[node] = {
            (e["type"], e["direction"], e["source"]["name"], e["destination"]["name"], e["destination"]["port"],  # type: ignore[index]
             e["path"] or e["reason"])
            for e in node_events
            if e["type"] in ("l7", "drop") and e["path"] != "/public/ok"
        }  # fmt: skip
    assert side["node-1"] == {
        ("l7", "egress", "shop/client", "shop/api", 8080, "/private"),
        ("l7", "egress", "shop/client", "shop/api", 8080, "/public/other"),
        ("drop", "egress", "shop/client", "shop/api", 5432, "Policy denied"),
    }, events["node-1"]
    assert side["node-2"] == {
        ("l7", "ingress", "shop/client", "shop/api", 8080, "/public/other"),
        ("drop", "ingress", "ops/monitor", "shop/api", 8080, "Policy denied"),
    }, events["node-2"]


def test_billing_api_table_over_two_nodes_from_the_fake_api_server() -> None:
    """Kubernetes mode: one API server for the cluster, each node's agent started with its own node name, takes
    its own pods (spec.nodeName) and knows the others' as remote; the billing-api table holds across nodes."""
    api = FakeApiInThread()
    nodes = spread_scenario([BILLING], 2)
    lines: list[str] = []
    try:
        outcomes = run_scenario(
            BILLING, lab_name("2k8s"), lines.append, prepare_agent=api.prepare_agent, apply=api.apply, nodes=nodes
        )
    finally:
        api.close()
    assert len(outcomes) == 44 and all(outcome.passed for outcome in outcomes), "\n".join(lines)
    assert len(crossing(outcomes, nodes)) * 2 >= len(outcomes), "\n".join(lines)


def test_a_policy_change_at_the_destination_node_fails_no_idempotent_request(two_nodes: Lab, tmp_path: Path) -> None:
    """The source node's Envoy keeps its upstream connections to the api pooled. When the api's node moves the
    port out of its Envoy (the api's ingress becomes L4 only), the pooled connection's next packet is decided
    again there and reaches the api's server, which does not know it and resets it: the request is sent again
    once on a new connection (GET), not answered 503. And back into Envoy: the same."""
    lab = two_nodes
    l4_only = tmp_path / "l4-only"
    l4_only.mkdir()
    for path in (EGRESS / "policies").iterdir():
        text = path.read_text()
        (l4_only / path.name).write_text(
            text.replace('      rules: {http: [{path: "/public/ok"}, {path: "/private"}]}\n', "")
        )
    assert (l4_only / "client.yaml").read_text() != (EGRESS / "policies" / "client.yaml").read_text()
    retries_before = lab.envoy_stat("cluster.sidecarless/original-destination.upstream_rq_retry", "node-1")
    try:
        for policies in (l4_only, EGRESS / "policies"):
            assert request(lab, "client", "/public/ok", 4)[0] == "200"  # a pooled upstream connection
            lab.apply(policies)
            for _ in range(3):
                assert request(lab, "client", "/public/ok", 4)[0] == "200"
    finally:
        lab.apply(EGRESS / "policies")
    assert lab.envoy_stat("cluster.sidecarless/original-destination.upstream_rq_retry", "node-1") > retries_before


@pytest.fixture(scope="module")
def wire(two_nodes: Lab) -> str:
    """A namespace on the network between the nodes (a port of the fabric's bridge): what a compromised host
    there could write. Named after the lab, so `lab down` removes it."""
    lab = two_nodes
    netns = f"scl-{lab.name}-wire"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", lab.fabric_netns, "link", "add", "wire", "type", "veth", "peer", "name", "eth0",
                    "netns", netns], check=True)  # fmt: skip
    subprocess.run(["ip", "-n", lab.fabric_netns, "link", "set", "wire", "master", "br0", "up"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
    return netns


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_the_network_between_nodes_cannot_bring_a_pod_address_of_the_node(
    two_nodes: Lab, wire: str, family: int
) -> None:
    """From the network, a packet with another node's pod address reaches a pod (native routing trusts the
    network between nodes: that pod's own node checked its source); one with an address of a pod of the
    receiving node is dropped there, as a pod's address arrives by its own veth only."""
    lab = two_nodes
    web, client, api = (lab.find_pod(name) for name in ("web", "client", "api"))
    assert web.node == api.node != client.node
    node = lab.node(web.node)
    node_mac = mac_of(node.netns, "eth0")

    def reaches_web(source: LabPod) -> bool:
        src, dst = (source.ip, web.ip) if family == 4 else (source.ip6, web.ip6)
        with watching(lab, "web", 1.5, proto="tcp", src=src, dst=dst, dport=8080, flags="02") as seen:
            command = ["ip", "netns", "exec", wire, sys.executable, str(RAWPOD), "send", "eth0", node_mac, "tcp-syn",
                       "--src", src, "--dst", dst, "--dport", "8080"]  # fmt: skip
            subprocess.run(command, check=True, timeout=30)
        return seen[0]

    assert reaches_web(client)  # another node's pod: the probe works
    assert not reaches_web(api)  # a pod of web's own node
    wait_until(
        lambda: "Invalid source ip" in [d["reason"] for d in agent_status(node.agent_socket)["recent_drops"]],
        "the drop on web's node",
    )


WEB_FROM_ENTITIES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [%s]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def test_the_entities_across_nodes_in_the_kernel(two_nodes: Lab, tmp_path: Path) -> None:
    """On web's node: the other node is remote-node (not host, not world), another node's pod is in cluster
    (not remote-node), an external host behind the other node is world; decided by the kernel of web's node."""
    lab = two_nodes
    web, client = lab.find_pod("web"), lab.find_pod("client")
    other = next(node for node in lab.nodes() if node.name != web.node)
    assert client.node == other.name

    def reaches_web(source: str) -> bool:
        """From a pod, or from the other node itself (its own address)."""
        command = ["curl", "-s", "-4", "-o", "/dev/null", "-w", "%{http_code}", "--connect-timeout", "1.5",
                   "--max-time", "3", f"http://{web.ip}:8080/"]  # fmt: skip
        prefix = ["ip", "netns", "exec", other.netns] if source == "node" else lab.exec_command(source, [])
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=30)
        return result.stdout == "200"

    expected = {
        "remote-node": {"node": True, "client": False, "partner": False},
        "host": {"node": False, "client": False, "partner": False},
        "cluster": {"node": True, "client": True, "partner": False},
        "world": {"node": False, "client": False, "partner": True},
    }
    try:
        for entity, verdicts in expected.items():
            policies = tmp_path / entity
            for path in (EGRESS / "policies").iterdir():
                write_policy(policies, path.name, path.read_text())
            write_policy(policies, "web.yaml", WEB_FROM_ENTITIES % entity)
            assert lab.apply(policies) == []
            observed = {source: reaches_web(source) for source in verdicts}
            assert observed == verdicts, entity
    finally:
        lab.apply(EGRESS / "policies")


def test_what_each_node_records_of_flows_it_starts(two_nodes: Lab) -> None:
    """Envoy's egress upstream connection leaving node-1 for the api on node-2 is recorded there (from-proxy:
    its replies go back to Envoy); a flow node-1 itself opens to another node is not (its replies are the
    node's, no pod policy governs them, and a busy node's own flows would crowd the pods' out of the map)."""
    lab = two_nodes
    client, api = lab.find_pod("client"), lab.find_pod("api")
    own = lab.node(client.node)
    assert request(lab, "client", "/public/ok", 4)[0] == "200"
    command = ["curl", "-s", "-4", "-o", "/dev/null", "--connect-timeout", "1.5", f"http://{api.ip}:9000/"]
    subprocess.run(["ip", "netns", "exec", own.netns, *command], capture_output=True, timeout=30)
    status, body = agent_get(own.agent_socket, "/v1/bpf/ct", timeout_s=5)
    assert status == 200
    flows = json.loads(body)
    proxied = [f for f in flows if f["source"].startswith(f"{client.ip}:") and f["destination"] == f"{api.ip}:8080"]
    assert any("from-proxy" in f["flags"] for f in proxied), flows
    assert not [f for f in flows if f["source"].startswith(f"{own.ips[0]}:")], flows
