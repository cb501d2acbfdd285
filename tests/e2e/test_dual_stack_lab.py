"""A dual-stack lab (`ipFamily: dual`, the default): pods get an IPv6 address next to the IPv4 one, named by
both in their hosts file, and the node reaches them over IPv6 (link-local gateway). The same policy gives the
same verdict over either family: in the kernel (L3/L4, identities from the ipcache, conntrack) and in Envoy
(L7 flows of both families handed to one listener with their original destination). An IPv6-only lab passes
the billing-api table."""

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecarless.api.client import agent_status
from sidecarless.lab.node import Lab
from sidecarless.lab.scenario import load_scenario, run_offline, run_scenario
from tests.e2e.conftest import BILLING, lab_name, wait_until


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    directory = tmp_path_factory.mktemp("dual")
    pods = directory / "pods.yaml"
    pods.write_text("ipFamily: dual\n" + (BILLING / "pods.yaml").read_text())
    shutil.copytree(BILLING / "policies-with-5432", directory / "policies")
    lab = Lab(lab_name("dual"))
    try:
        lab.up(pods, directory / "policies")
        yield lab
    finally:
        lab.down()


def curl(lab: Lab, pod: str, family: int, path: str) -> str:
    command = ["curl", "-sS", f"-{family}", "--connect-timeout", "1.5", "--max-time", "5", "-o", "/dev/null",
               "-w", "%{http_code}", f"http://billing-api:8080{path}"]  # fmt: skip
    result = subprocess.run(lab.exec_command(pod, command), capture_output=True, text=True, timeout=30)
    return "dropped" if result.returncode == 28 else result.stdout


def test_pods_have_both_addresses_and_names(lab: Lab) -> None:
    server = lab.find_pod("billing-api")
    assert server.ip.startswith("10.244.1.") and server.ip6.startswith("fd00:10:244:1::")
    addresses = subprocess.run(["ip", "-n", server.netns, "-6", "addr", "show", "dev", "eth0"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    assert f"{server.ip6}/128" in addresses
    hosts = (Path("/etc/netns") / server.netns / "hosts").read_text().splitlines()
    assert f"{server.ip} billing-api billing-api.production" in hosts
    assert f"{server.ip6} billing-api billing-api.production" in hosts
    endpoints = {e["pod"]: e for e in agent_status(lab.agent_socket)["endpoints"]}
    assert endpoints["production/billing-api"]["ip6"] == server.ip6
    assert lab.status()["pods"][0]["ip6"]


def test_ipv6_is_routed_between_pod_and_node(lab: Lab) -> None:
    """The pod's default route is the node's link-local address on its veth; the node routes the pod's /128
    to that veth (DATAPATH.md: neighbours)."""
    server = lab.find_pod("billing-api")
    pod_routes = subprocess.run(["ip", "-n", server.netns, "-6", "route", "show", "default"], capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
    assert "via fe80::1 dev eth0" in pod_routes
    node_routes = subprocess.run(["ip", "-n", lab.node_netns, "-6", "route", "show", f"{server.ip6}/128"],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert f"dev {server.interface}" in node_routes


def test_a_pod_is_found_by_its_ipv6_route(lab: Lab) -> None:
    """How the Kubernetes source finds a pod's veth (routed CNIs): the node's /32 or /128 route to it."""
    server = lab.find_pod("billing-api")
    script = (
        "import json, sys; from sidecarless.redirect.netlink import route_interfaces; "
        "print(json.dumps(route_interfaces(sys.argv[1:])))"
    )
    found = subprocess.run(["ip", "netns", "exec", lab.node_netns, sys.executable, "-c", script, server.ip, server.ip6],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert json.loads(found) == {server.ip: server.interface, server.ip6: server.interface}


def nc(lab: Lab, pod: str, family: int, port: int) -> str:
    command = ["nc", f"-{family}", "-N", "-w", "2", "billing-api", str(port)]
    result = subprocess.run(lab.exec_command(pod, command), input="ping\n", capture_output=True, text=True, timeout=30)
    return "connects" if result.stdout == "ping\n" else "dropped"


def test_ipv6_gets_the_verdicts_ipv4_gets(lab: Lab) -> None:
    """L7 (allowed path, denied path), L3 (a peer without an allow) and L4 (the 5432 rule), each family. A 403
    comes from Envoy (the flow was handed to it), a 200 from the server (Envoy kept the original destination)."""
    for family in (4, 6):
        assert curl(lab, "prometheus", family, "/metrics") == "200", family
        assert curl(lab, "prometheus", family, "/admin") == "403", family
        assert curl(lab, "dev-tool", family, "/metrics") == "dropped", family
        assert nc(lab, "finance-batch", family, 5432) == "connects", family
        assert nc(lab, "dev-tool", family, 5432) == "dropped", family


def test_monitor_shows_an_ipv6_drop_with_its_reason(lab: Lab) -> None:
    """`sidecarless monitor --type drop`: the dropped IPv6 flow with both addresses, its reason and its pods."""
    from tests.e2e.test_observability import Monitor, _monitors

    attacker, server = lab.find_pod("dev-tool"), lab.find_pod("billing-api")
    monitor = Monitor(lab, "--type", "drop")
    try:
        wait_until(lambda: _monitors(lab) >= 1, "the monitor to subscribe", timeout_s=10)
        assert curl(lab, "dev-tool", 6, "/health") == "dropped"

        def shown() -> bool:
            return any(
                event["source"]["ip"] == attacker.ip6 and event["destination"]["ip"] == server.ip6  # type: ignore[index]
                and event["destination"]["port"] == 8080 and event["reason"] == "Policy denied"  # type: ignore[index]
                and event["destination"]["name"] == "production/billing-api"  # type: ignore[index]
                for _, event in monitor.events
            )  # fmt: skip

        wait_until(shown, "the monitor to show the IPv6 drop", timeout_s=5)
    finally:
        monitor.stop()


def test_an_ipv6_only_pod_sends_no_ipv4_of_any_source(tmp_path: Path) -> None:
    """A pod without an IPv4 address has no IPv4 source of its own: a frame it writes with one (a world
    address, an unused pod address) is dropped as `Invalid source ip`, not judged by policy."""
    from tests.e2e.test_hostile_pod import send, wait_for_drop

    pods = tmp_path / "pods.yaml"
    pods.write_text("ipFamily: ipv6\n" + (BILLING / "pods.yaml").read_text())
    lab = Lab(lab_name("v6only"))
    try:
        lab.up(pods, BILLING / "policies")
        attacker = lab.find_pod("dev-tool")
        assert attacker.ip == "" and attacker.ip6
        for source in ("198.51.100.7", "10.244.1.200"):
            send(lab, "dev-tool", "udp", "--src", source, "--dst", "10.244.0.1", "--dport", "5353")
        wait_for_drop(lab, "Invalid source ip")
    finally:
        lab.down()


def test_an_ipv6_only_lab_passes_the_billing_api_table(tmp_path: Path) -> None:
    table = tmp_path / "billing-api"
    shutil.copytree(BILLING, table)
    (table / "pods.yaml").write_text("ipFamily: ipv6\n" + (BILLING / "pods.yaml").read_text())
    lines: list[str] = []
    outcomes = run_scenario(table, lab_name("v6table"), report=lines.append)
    assert len(outcomes) == len(load_scenario(BILLING).cases), "\n".join(lines)
    assert all(outcome.passed for outcome in outcomes), "\n".join(lines)


WORLD_PODS = """
pods:
  - {name: client, namespace: shop, labels: {app: client}}
  - {name: server, namespace: shop, labels: {app: server}, serve: [{port: 8080, protocol: http}]}
external:
  - {name: internet, ip: 198.51.100.10, serve: [{port: 8080, protocol: http}]}
  - {name: internet6, ip: "2001:db8:10::10", serve: [{port: 8080, protocol: http}]}
"""
WORLD_POLICIES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress: [{toCIDR: ["::/0"]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress: [{fromCIDR: ["::/0"]}]
"""
WORLD_CASES = """
cases:
  - {id: to-world-ipv6, from: client, to: internet6, port: 8080, expect: 200}
  - {id: to-world-ipv4, from: client, to: internet, port: 8080, expect: dropped}
  - {id: from-world-ipv6, from: internet6, to: server, port: 8080, expect: 200}
  - {id: from-world-ipv4, from: internet, to: server, port: 8080, expect: dropped}
"""


def test_the_world_of_each_family_in_the_kernel(tmp_path: Path) -> None:
    """`::/0` is the IPv6 world alone (identity world-ipv6): an IPv6 address no other identity holds is in it,
    an IPv4 one is not, as `policy trace` says; the kernel tells the two worlds apart by the address's family."""
    (tmp_path / "pods.yaml").write_text(WORLD_PODS)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "world.yaml").write_text(WORLD_POLICIES)
    (tmp_path / "cases.yaml").write_text(WORLD_CASES)
    assert all(outcome.passed for outcome in run_offline(tmp_path))
    lines: list[str] = []
    outcomes = run_scenario(tmp_path, lab_name("worlds"), report=lines.append)
    assert len(outcomes) == 4 and all(outcome.passed for outcome in outcomes), "\n".join(lines)
