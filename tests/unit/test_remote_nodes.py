"""Other nodes of the cluster (issue 15, first step): their addresses are the remote-node identity, which the
entity `remote-node` selects, `cluster` includes and `world` and `host` do not, in both families."""

import json
import textwrap
from pathlib import Path

import pytest

from sidecarless.policy.compile import compile_plan
from sidecarless.policy.identity import HOST_IDENTITY, REMOTE_NODE_IDENTITY
from sidecarless.policy.model import Node
from sidecarless.policy.plan import identity_of_address
from sidecarless.policy.schema import parse_policy_file
from sidecarless.policy.trace import trace
from sidecarless.sources.files import read_endpoints
from tests.unit.test_dual_stack import PODS

NODE = Node(ips=("10.244.0.1", "fd00:10:244::1"), remote_ips=("10.244.0.2", "fd00:10:244::2"))
POLICY = """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: server, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
        - fromEntities: [%s]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def verdict(entity: str, source: str) -> str:
    policies = parse_policy_file("p.yaml", textwrap.dedent(POLICY % entity)).policies
    plan = compile_plan(policies, PODS, NODE)
    return trace(plan, source, "server", 8080).verdict


def test_other_nodes_addresses_are_the_remote_node_identity() -> None:
    plan = compile_plan([], PODS, NODE)
    assert (
        identity_of_address(plan, "10.244.0.2") == identity_of_address(plan, "fd00:10:244::2") == REMOTE_NODE_IDENTITY
    )
    assert identity_of_address(plan, "10.244.0.1") == HOST_IDENTITY
    # A source that lists this node among the others does not make it remote.
    both = compile_plan([], PODS, Node(ips=("10.244.0.1",), remote_ips=("10.244.0.1", "10.244.0.2")))
    assert identity_of_address(both, "10.244.0.1") == HOST_IDENTITY


@pytest.mark.parametrize(
    ("entity", "allowed"),
    [("remote-node", True), ("cluster", True), ("all", True), ("world", False), ("host", False)],
)
@pytest.mark.parametrize("source", ["10.244.0.2", "fd00:10:244::2"])
def test_entities_and_the_remote_node(entity: str, allowed: bool, source: str) -> None:
    assert verdict(entity, source) == ("allowed" if allowed else "dropped")


def test_remote_node_selects_no_world_address() -> None:
    assert verdict("remote-node", "198.51.100.7") == "dropped"
    assert verdict("remote-node", "2001:db8::7") == "dropped"


def test_one_endpoints_file_for_several_nodes(tmp_path: Path) -> None:
    """Each agent reads the same file: its own pods are local (with their interface), the others' remote, its
    own addresses the host and every other node's remote-node; a file without nodes is one node, as before."""
    document = {
        "endpoints": [
            {"name": "a", "namespace": "shop", "ip": "10.244.1.10", "interface": "lxc0", "node": "node-1"},
            {"name": "b", "namespace": "shop", "ip": "10.244.2.10", "ip6": "fd00:10:244:2::a", "interface": "lxc0",
             "node": "node-2"},
        ],
        "node": {"interfaces": []},
        "nodes": [{"name": "node-1", "ips": ["10.244.0.1"]}, {"name": "node-2", "ips": ["10.244.0.2", "fd00::2"]}],
    }  # fmt: skip
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps(document))
    for me, local, remote in (("node-1", "a", "b"), ("node-2", "b", "a")):
        state = read_endpoints(path, me)
        by_name = {e.name: e for e in state.endpoints}
        assert (by_name[local].local, by_name[local].interface) == (True, "lxc0"), me
        assert (by_name[remote].local, by_name[remote].interface) == (False, ""), me
        assert set(state.node.ips).isdisjoint(state.node.remote_ips), me
    assert read_endpoints(path, "node-2").node.remote_ips == ("10.244.0.1",)
    assert read_endpoints(path, "node-1").node.remote_ips == ("10.244.0.2", "fd00::2")
    single = {"endpoints": [{"name": "a", "namespace": "shop", "ip": "10.244.1.10", "interface": "lxc0"}],
              "node": {"ips": ["10.244.0.1"]}}  # fmt: skip
    path.write_text(json.dumps(single))
    state = read_endpoints(path, "any-name")
    assert state.endpoints[0].local and state.node.ips == ("10.244.0.1",) and state.node.remote_ips == ()
