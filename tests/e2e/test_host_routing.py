"""Host routing: an allowed flow between two pods of the node goes veth to veth (bpf, the default), past the
node's IP stack and netfilter, or through the node's stack (legacy). Both enforce the same policy."""

import json
import subprocess
from collections.abc import Iterator

import pytest

from sidecarless.api.client import agent_status
from sidecarless.lab.node import Lab
from tests.e2e.conftest import billing, tcp_echo

COUNT_TABLE = "scl_test_count"


@pytest.fixture(scope="module", params=["bpf", "legacy"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with billing(f"rt-{request.param}", "policies-with-5432", ("--host-routing", request.param)) as lab:
        yield lab


def _count_forwarded_to(lab: Lab, ip: str, port: int) -> None:
    """A netfilter counter in the node's forward hook for packets to ip:port, which the node's stack routes."""
    family = "ip6" if ":" in ip else "ip"
    rules = f"""table inet {COUNT_TABLE}
delete table inet {COUNT_TABLE}
table inet {COUNT_TABLE} {{
    chain forward {{
        type filter hook forward priority 0; policy accept;
        {family} daddr {ip} tcp dport {port} counter
    }}
}}
"""
    subprocess.run(["ip", "netns", "exec", lab.node_netns, "nft", "-f", "-"], input=rules, text=True, check=True)


def _forwarded_packets(lab: Lab) -> int:
    listing = subprocess.run(
        ["ip", "netns", "exec", lab.node_netns, "nft", "-j", "list", "table", "inet", COUNT_TABLE],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    counters = [
        item["rule"]["expr"][-1]["counter"] for item in json.loads(listing.stdout)["nftables"] if "rule" in item
    ]
    return sum(int(counter["packets"]) for counter in counters)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_flows_between_pods_of_the_node_go_direct_only_with_bpf_host_routing(lab: Lab, family: int) -> None:
    mode = agent_status(lab.agent_socket)["datapath"]["host_routing"]
    server = lab.find_pod("billing-api")
    _count_forwarded_to(lab, server.ip6 if family == 6 else server.ip, 5432)
    direct_before = agent_status(lab.agent_socket)["datapath"]["counters"]["direct_flows"]

    assert tcp_echo(lab, "finance-batch", 5432, family)  # allowed at L4: kept in the kernel
    assert not tcp_echo(lab, "dev-tool", 5432, family)  # denied: in both modes

    direct_flows = agent_status(lab.agent_socket)["datapath"]["counters"]["direct_flows"] - direct_before
    forwarded = _forwarded_packets(lab)
    if mode == "bpf":
        assert direct_flows == 1 and forwarded == 0, (direct_flows, forwarded)
    else:
        assert mode == "legacy"
        assert direct_flows == 0 and forwarded > 0, (direct_flows, forwarded)
