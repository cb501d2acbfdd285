from dataclasses import replace

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import wrappers_pb2

from sidecarless.observe.events import DROP, L7, Event, EventFilter, Peer, peer_of
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Node
from sidecarless.policy.plan import identity_of_address
from sidecarless.xds.accesslog import _entry
from tests.unit.test_dual_stack import PODS
from tests.unit.test_policy_semantics import BILLING_POLICY, plan_of


def test_access_log_entries_become_l7_verdicts() -> None:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.downstream_direct_remote_address.CopyFrom(
        address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.244.1.11", port_value=40000))
    )
    entry.common_properties.downstream_local_address.CopyFrom(
        address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.244.1.10", port_value=8080))
    )
    entry.request.request_method = base_pb2.POST
    entry.request.path = "/metrics"
    entry.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=403))
    entry.response.response_code_details = "rbac_access_denied_matched_policy[none]"
    parsed = _entry("ingress/production/billing-api", entry)
    assert (parsed.method, parsed.path, parsed.status, parsed.verdict) == ("POST", "/metrics", 403, "Denied")
    assert (parsed.client_ip, parsed.destination_port) == ("10.244.1.11", 8080)


def test_event_text_is_shaped_like_cilium_monitor_and_hubble() -> None:
    plan = plan_of(BILLING_POLICY)
    source = peer_of(plan, ("10.244.0.1",), "10.244.1.13", 41234)
    destination = peer_of(plan, ("10.244.0.1",), "10.244.1.10", 8080)
    drop = Event(0.0, DROP, source, destination, "tcp", "ingress", reason="Policy denied", tcp_flags="SYN")
    assert drop.text() == (
        f"xx drop (Policy denied) production/dev-tool:41234 (identity {source.identity}) -> "
        f"production/billing-api:8080 (identity {destination.identity}) tcp SYN"
    )
    denied = Event(0.0, L7, source, destination, "tcp", "ingress", verdict="Denied", method="POST", path="/metrics",
                   status=403, latency_ms=0.4)  # fmt: skip
    assert (
        denied.text()
        == "<- http production/dev-tool -> production/billing-api:8080 POST /metrics => 403 Denied (0.4 ms)"
    )
    assert EventFilter(("drop",), ("dev-tool",), ("billing-api",)).matches(drop)
    assert not EventFilter(("l7",)).matches(drop)
    assert not EventFilter(from_pods=("prometheus",)).matches(drop)
    world = peer_of(plan, ("10.244.0.1",), "198.51.100.7", 80)
    assert world == Peer("198.51.100.7", 80, 2, "world (198.51.100.7)")


def test_another_nodes_pods_and_the_other_nodes_are_named() -> None:
    """On a node, events name another node's pod as the pod (not the world) and another node as remote-node."""
    remote = replace(PODS[0], interface="", local=False)
    plan = compile_plan([], [remote, *PODS[1:]], Node(ips=("10.244.0.1",), remote_ips=("10.244.0.2",)))
    peer = peer_of(plan, ("10.244.0.1",), remote.ip6, 8080)
    assert (peer.name, peer.identity) == (remote.key, identity_of_address(plan, remote.ip6))
    assert peer.identity > 255
    assert peer_of(plan, ("10.244.0.1",), "10.244.0.2", 80).name == "remote-node (10.244.0.2)"
    assert peer_of(plan, ("10.244.0.1",), "10.244.0.2", 80).identity == 6
