"""The lab's nodes (issue 15): a pod file names each pod's node; addresses and interfaces per node; the spread
that puts a table's pods on two nodes; the endpoints file every node's agent reads."""

import json
from pathlib import Path

import pytest

from sidecarless.lab.pods import PodsFileError, node_addresses, node_names, parse_pods, place
from sidecarless.lab.scenario import Case, spread_over_nodes
from sidecarless.sources.files import read_endpoints

PODS = """
pods:
  - {name: a, namespace: ns, node: east}
  - {name: b, namespace: ns, node: west}
  - {name: c, namespace: ns}
  - {name: d, namespace: ns, node: west}
external:
  - {name: world, ip: 198.51.100.10, node: west}
  - {name: world6, ip: "2001:db8::10"}
"""


def test_each_node_has_its_pod_network_and_interfaces() -> None:
    pods = parse_pods("pods.yaml", PODS)
    assert node_names(pods) == ["east", "west"]
    placed = {p.pod.key: (p.node, p.ip, p.ip6, p.interface) for p in place(pods)}
    assert placed == {
        "ns/a": (1, "10.244.1.10", "fd00:10:244:1::a", "lxc0"),
        "ns/b": (2, "10.244.2.10", "fd00:10:244:2::a", "lxc0"),
        "ns/c": (1, "10.244.1.11", "fd00:10:244:1::b", "lxc1"),  # no node: the first
        "ns/d": (2, "10.244.2.11", "fd00:10:244:2::b", "lxc1"),
        "world": (2, "198.51.100.10", "", "ext0"),
        "world6": (1, "", "2001:db8::10", "ext0"),
    }
    assert node_addresses(place(pods), 2) == ("10.244.0.2", "fd00:10:244::2")


def test_a_file_without_nodes_is_one_node_as_before() -> None:
    pods = parse_pods("pods.yaml", "pods: [{name: a, namespace: ns}, {name: b, namespace: ns}]")
    assert node_names(pods) == []
    assert [(p.node, p.ip) for p in place(pods)] == [(1, "10.244.1.10"), (1, "10.244.1.11")]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("pods: [{name: a, namespace: ns, node: East}]", "pods.yaml:1: pods[0].node: required, a DNS label"),
        ("pods: [{name: a, namespace: ns, node: [x]}]", "pods.yaml:1: pods[0].node: required, a DNS label"),
        ("external: [{name: w, ip: 198.51.100.1, node: ''}]", "pods.yaml:1: external[0].node: required, a DNS label"),
    ],
)
def test_a_bad_node_is_an_error_naming_line_and_field(text: str, error: str) -> None:
    with pytest.raises(PodsFileError) as raised:
        parse_pods("pods.yaml", text)
    assert str(raised.value).startswith(error)


def test_too_many_nodes_is_an_error() -> None:
    text = "pods:\n" + "".join(f"  - {{name: p{i}, namespace: ns, node: n{i}}}\n" for i in range(255))
    with pytest.raises(PodsFileError, match="more than 254 nodes"):
        parse_pods("pods.yaml", text)


def case(source: str, destination: str) -> Case:
    return Case(id=f"{source}-{destination}", source=source, destination=destination, port=80, expect=200)


def test_the_spread_puts_the_ends_of_cases_on_different_nodes() -> None:
    pods = parse_pods(
        "pods.yaml",
        "pods: [{name: client, namespace: ns}, {name: server, namespace: ns}, {name: other, namespace: ns}]",
    )
    cases = [case("client", "server"), case("ns/other", "server"), case("client", "other")]
    nodes = spread_over_nodes(pods, cases, 2)
    assert set(nodes) == {"ns/client", "ns/server", "ns/other"}
    assert nodes["ns/client"] != nodes["ns/server"] and nodes["ns/other"] != nodes["ns/server"]
    crossed = sum(nodes[f"ns/{c.source.rpartition('/')[2]}"] != nodes[f"ns/{c.destination}"] for c in cases)
    assert crossed * 2 >= len(cases)


def test_the_spread_keeps_a_pod_the_file_places() -> None:
    pods = parse_pods("pods.yaml", "pods: [{name: a, namespace: ns, node: node-2}, {name: b, namespace: ns}]")
    assert spread_over_nodes(pods, [case("a", "b")], 2) == {"ns/b": "node-1"}


def test_every_node_reads_its_own_side_of_one_endpoints_file(tmp_path: Path) -> None:
    document = {
        "endpoints": [
            {"name": "a", "namespace": "ns", "ip": "10.244.1.10", "interface": "lxc0", "node": "east"},
            {"name": "b", "namespace": "ns", "ip": "10.244.2.10", "interface": "lxc0", "node": "west"},
        ],
        "nodes": [
            {"name": "east", "ips": ["10.244.0.1"], "interfaces": ["eth0"]},
            {"name": "west", "ips": ["10.244.0.2"], "interfaces": ["eth0", "ext0"]},
        ],
    }
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps(document))
    west = read_endpoints(path, "west")
    assert [(e.key, e.local, e.interface) for e in west.endpoints] == [("ns/a", False, ""), ("ns/b", True, "lxc0")]
    assert west.node.ips == ("10.244.0.2",) and west.node.remote_ips == ("10.244.0.1",)
    assert west.interfaces == ("eth0", "ext0")
    assert read_endpoints(path, "east").interfaces == ("eth0",)
