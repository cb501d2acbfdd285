"""A hostile pod gets nothing (issue 12): each attack as a pod with CAP_NET_RAW would try it, with frames it
writes itself (tests/e2e/rawpod.py), against the real datapath in a lab.

Pods in `shop`: server (HTTP 8080 and 9000, TCP echo 5432, UDP echo 5353), friend (allowed 5432, 5353, 9000 at
L4 and GET /public on 8080; its own ingress is default-deny) and attacker (allowed nothing)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sidecarless.api.client import agent_get, agent_status
from sidecarless.lab.node import Lab
from sidecarless.lab.topology import LabPod
from tests.e2e.conftest import lab_name, wait_until, write_policy

RAWPOD = Path(__file__).resolve().parent / "rawpod.py"

PODS = """
pods:
  - name: server
    namespace: shop
    labels: {app: server}
    serve:
      - {port: 8080, protocol: http}
      - {port: 9000, protocol: http}
      - {port: 5432, protocol: tcp}
      - {port: 5353, protocol: udp}
  - {name: friend, namespace: shop, labels: {app: friend}}
  - {name: attacker, namespace: shop, labels: {app: attacker}}
"""

SERVER_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: friend}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
%s
"""
L4_ALLOWS = """
  - fromEndpoints: [{matchLabels: {app: friend}}]
    toPorts:
    - ports: [{port: "5432", protocol: TCP}, {port: "5353", protocol: UDP}]
"""
PORT_9000_L4 = """
  - fromEndpoints: [{matchLabels: {app: friend}}]
    toPorts:
    - ports: [{port: "9000", protocol: TCP}]
"""
PORT_9000_L7 = """
  - fromEndpoints: [{matchLabels: {app: friend}}]
    toPorts:
    - ports: [{port: "9000", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
"""
FRIEND_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: friend, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: friend}}
  ingress: [{}]
"""
UDP_TIMEOUT_S = 3
POLICY_MAP_SIZE = 5000


def install(lab: Lab, directory: Path, server_items: str) -> None:
    """The server's policy with these extra ingress items, and the friend's ingress default-deny, enforced."""
    write_policy(directory, "server.yaml", SERVER_POLICY % server_items)
    write_policy(directory, "friend.yaml", FRIEND_POLICY)
    assert lab.apply(directory) == []


@contextmanager
def shop_lab(directory: Path, tag: str, options: tuple[str, ...] = (), sockmap: bool = False) -> Iterator[Lab]:
    """The shop's pods with their first policies in force, removed afterwards (also on failure)."""
    pods = write_policy(directory, "pods.yaml", PODS)
    policies = directory / "policies"
    write_policy(policies, "server.yaml", SERVER_POLICY % (L4_ALLOWS + PORT_9000_L4))
    write_policy(policies, "friend.yaml", FRIEND_POLICY)
    lab = Lab(lab_name(tag))
    try:
        lab.up(pods, policies, options, sockmap=sockmap)
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    options = ("--bpf-ct-timeout-regular-any", str(UDP_TIMEOUT_S), "--conntrack-gc-interval", "1",
               "--bpf-policy-map-max", str(POLICY_MAP_SIZE))  # fmt: skip
    # The TC programs alone: the open-connection attacks on the kernel path (test_sockmap.py tries them on
    # accelerated sockets).
    with shop_lab(tmp_path_factory.mktemp("hostile"), "hostile", options, sockmap=False) as lab:
        yield lab


@pytest.fixture
def policies(lab: Lab, tmp_path: Path) -> Iterator[Path]:
    """A policy directory the test may change; the lab's first policies are back in force afterwards."""
    yield tmp_path / "policies"
    install(lab, tmp_path / "restored", L4_ALLOWS + PORT_9000_L4)


def pod(lab: Lab, name: str) -> LabPod:
    return lab.find_pod(name)


def address(lab: Lab, name: str, family: int) -> str:
    found = pod(lab, name)
    return found.ip6 if family == 6 else found.ip


# Every attack below is tried in both families: the lab's pods are dual-stack.
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def mac_of(netns: str, interface: str) -> str:
    links = json.loads(subprocess.run(["ip", "-n", netns, "-j", "link", "show", interface], capture_output=True,
                                      text=True, check=True).stdout)  # fmt: skip
    return str(links[0]["address"])


def send(lab: Lab, sender: str, kind: str, *options: str) -> None:
    """A frame written by `sender` on its eth0 to the node."""
    source = pod(lab, sender)
    node_mac = mac_of(lab.node_netns, source.interface)
    command = ["ip", "netns", "exec", source.netns, sys.executable, str(RAWPOD), "send", "eth0", node_mac, kind]
    subprocess.run([*command, *options], check=True, timeout=30)


def send_into_pod(lab: Lab, receiver: str, kind: str, *options: str) -> None:
    """A frame the node writes on a pod's veth, towards the pod (the to-pod direction)."""
    target = pod(lab, receiver)
    pod_mac = mac_of(target.netns, "eth0")
    command = ["ip", "netns", "exec", lab.node_netns, sys.executable, str(RAWPOD), "send", target.interface,
               pod_mac, kind]  # fmt: skip
    subprocess.run([*command, *options], check=True, timeout=30)


@contextmanager
def watching(lab: Lab, watcher: str, seconds: float, **match: object) -> Iterator[list[bool]]:
    """Watch a pod's eth0 for a frame; the yielded list holds, afterwards, whether one was seen."""
    command = ["ip", "netns", "exec", pod(lab, watcher).netns, sys.executable, str(RAWPOD), "watch", "eth0",
               str(seconds), *(f"{key}={value}" for key, value in match.items())]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready", process.stderr.read() if process.stderr else ""
    seen: list[bool] = []
    try:
        yield seen
    finally:
        out, err = process.communicate(timeout=seconds + 30)
        assert process.returncode == 0, err
        seen.append(out.strip() == "seen")


def recent_drop_reasons(lab: Lab) -> list[str]:
    return [drop["reason"] for drop in agent_status(lab.agent_socket)["recent_drops"]]


def wait_for_drop(lab: Lab, reason: str) -> None:
    wait_until(lambda: reason in recent_drop_reasons(lab), f"a drop event with reason {reason!r}", timeout_s=5)


def syn_answered(lab: Lab, sender: str, source: str, port: int, vlan: tuple[str, ...] = (), watcher: str = "") -> bool:
    """`sender` writes a SYN from address `source` to the server (in `source`'s family); does a SYN-ACK come
    back to `watcher`?"""
    server = address(lab, "server", 6 if ":" in source else 4)
    sport = 40000 + port % 1000
    with watching(lab, watcher or sender, 1.5, proto="tcp", src=server, sport=port, dport=sport, flags="12") as seen:
        send(lab, sender, "tcp-syn", "--src", source, "--dst", server, "--sport", str(sport), "--dport", str(port),
             *(f"--vlan={tag}" for tag in vlan))  # fmt: skip
    return seen[0]


def test_map_sizes_are_the_agents_flags(lab: Lab) -> None:
    maps = agent_status(lab.agent_socket)["datapath"]["maps"]
    assert maps["scl_policy"]["max_entries"] == POLICY_MAP_SIZE
    assert maps["scl_conntrack"]["max_entries"] == 65536


@FAMILIES
def test_a_spoofed_tcp_source_gets_no_answer(lab: Lab, family: int) -> None:
    friend = address(lab, "friend", family)
    # The probe works: friend's own SYN to 5432 is answered (to friend).
    assert syn_answered(lab, "friend", friend, 5432)
    # The attacker's SYN claiming to be friend: the server never answers friend.
    assert not syn_answered(lab, "attacker", friend, 5432, watcher="friend")
    wait_for_drop(lab, "Invalid source ip")


@FAMILIES
def test_a_spoofed_udp_source_gets_no_answer(lab: Lab, family: int) -> None:
    friend, server = address(lab, "friend", family), address(lab, "server", family)
    options = ("--dst", server, "--sport", "41000", "--dport", "5353")
    with watching(lab, "friend", 1.5, proto="udp", src=server, sport=5353, dport=41000) as seen:
        send(lab, "friend", "udp", "--src", friend, *options)
    assert seen[0], "friend's own datagram is echoed"
    with watching(lab, "friend", 1.5, proto="udp", src=server, sport=5353, dport=41001) as seen:
        send(lab, "attacker", "udp", "--src", friend, "--dst", server, "--sport", "41001", "--dport", "5353")
    assert not seen[0]
    wait_for_drop(lab, "Invalid source ip")


@FAMILIES
def test_udp_priming_with_a_spoofed_reply_opens_nothing(lab: Lab, family: int) -> None:
    server, attacker = address(lab, "server", family), address(lab, "attacker", family)
    # "From the server" to the attacker: if it created a flow, the attacker's datagram would pass as its reply.
    send(lab, "attacker", "udp", "--src", server, "--dst", attacker, "--sport", "5353", "--dport", "42000")
    socket_family, wildcard = ("AF_INET6", "::") if family == 6 else ("AF_INET", "0.0.0.0")
    script = (
        f"import socket; s = socket.socket(socket.{socket_family}, socket.SOCK_DGRAM); s.bind(('{wildcard}', 42000)); "
        f"s.settimeout(1.5); s.sendto(b'hello', ('{server}', 5353))\n"
        "try: print(s.recv(100))\nexcept socket.timeout: print('timeout')"
    )
    answer = subprocess.run(lab.exec_command("attacker", [sys.executable, "-c", script]), capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert answer.stdout.strip() == "timeout", answer
    wait_for_drop(lab, "Invalid source ip")


@FAMILIES
@pytest.mark.parametrize("tags", [("0x88a8:0", "0x8100:0"), ("0x8100:0",), ("0x8100:100",)], ids=str)
def test_vlan_tagged_frames_are_dropped(lab: Lab, tags: tuple[str, ...], family: int) -> None:
    attacker = address(lab, "attacker", family)
    # 5432: a port nobody but friend may reach; 8080: an L7 port (tagged, it would skip the proxy).
    for port in (5432, 8080):
        assert not syn_answered(lab, "attacker", attacker, port, tags)
    # Even friend's own, otherwise allowed, SYN is dropped when tagged: the frame type decides.
    assert not syn_answered(lab, "friend", address(lab, "friend", family), 5432, tags)
    wait_for_drop(lab, "VLAN traffic disallowed")


@pytest.mark.parametrize("ethertype", ["0x1234", "0x88cc", "0x8847", "0x86dd"], ids=str)
def test_other_ethertypes_are_dropped_whatever_they_carry(lab: Lab, ethertype: str) -> None:
    """An IPv4 SYN to a port the attacker may not reach, written under another ethertype (unknown, LLDP,
    MPLS, IPv6): nothing reaches the server, and the drop names the ethertype."""
    attacker, server = pod(lab, "attacker").ip, pod(lab, "server").ip
    with watching(lab, "server", 1.0, proto="tcp", dport=5432, src=attacker) as seen:
        send(lab, "attacker", "tcp-syn", "--src", attacker, "--dst", server, "--dport", "5432",
             "--ethertype", ethertype)  # fmt: skip
    assert not seen[0]
    wanted = f"ethertype {int(ethertype, 16):#06x}"
    wait_until(lambda: any(d["protocol"] == wanted for d in agent_status(lab.agent_socket)["recent_drops"]),
               f"a drop event for {wanted}", timeout_s=5)  # fmt: skip


# A datagram larger than the pods' MTU (1500): the kernel sends it in fragments, and so does the echo.
LARGE_DATAGRAM_CLIENT = """
import socket, sys
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(("server", 5353))
for round in range(2):  # the first opens the flow, the second travels on it
    payload = bytes([65 + round]) * 4000
    s.send(payload)
    print(s.recv(8192) == payload, flush=True)
"""


@FAMILIES
def test_a_large_datagram_on_an_allowed_flow_arrives_whole_both_ways(lab: Lab, family: int) -> None:
    result = subprocess.run(lab.exec_command("friend", [sys.executable, "-c", LARGE_DATAGRAM_CLIENT, str(family)]),
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.stdout.split() == ["True", "True"], result


@FAMILIES
def test_a_later_fragment_without_its_first_is_dropped(lab: Lab, family: int) -> None:
    """A later fragment whose bytes look like a UDP header to the echo port: a datapath that read ports from
    it would take it for the friend's allowed flow."""
    friend, server = address(lab, "friend", family), address(lab, "server", family)
    send(lab, "friend", "fragment", "--src", friend, "--dst", server, "--sport", "44000", "--dport", "5353")
    wait_for_drop(lab, "Fragment of an unknown datagram")


def udp_echoed(lab: Lab, sender: str, source: str, sport: int, *options: str) -> bool:
    """`sender` writes a datagram from `source` to the server's UDP echo; does the echo come back to `sender`?"""
    server = address(lab, "server", 6 if ":" in source else 4)
    with watching(lab, sender, 1.5, proto="udp", src=server, sport=5353, dport=sport) as seen:
        send(lab, sender, "udp", "--src", source, "--dst", server, "--sport", str(sport), "--dport", "5353", *options)
    return seen[0]


def test_known_ipv6_extension_headers_are_skipped_on_an_allowed_flow(lab: Lab) -> None:
    """Hop-by-hop and destination options before the UDP header: the datapath finds the ports behind them."""
    friend = address(lab, "friend", 6)
    assert udp_echoed(lab, "friend", friend, 45000, "--extension", "hop", "--extension", "dst")
    assert not udp_echoed(lab, "attacker", address(lab, "attacker", 6), 45001, "--extension", "hop")


@pytest.mark.parametrize(
    "extensions", [("routing",), ("hop", "routing"), ("dst",) * 6, ("hop",) + ("dst",) * 6], ids=str
)
def test_ipv6_headers_the_datapath_cannot_vouch_for_are_dropped(lab: Lab, extensions: tuple[str, ...]) -> None:
    """A routing header with a segment left (the packet's real destination is another than the one checked),
    or more extension headers than are walked: dropped, even on friend's allowed flow."""
    options = [option for kind in extensions for option in ("--extension", kind)]
    assert not udp_echoed(lab, "friend", address(lab, "friend", 6), 45100 + len(extensions), *options)
    wait_for_drop(lab, "Invalid IPv6 extension header")


def test_a_pod_advertises_no_address_but_its_own_and_no_routes(lab: Lab) -> None:
    """Neighbour discovery works (friend's datagram and its echo cross the node over IPv6), but an advertisement
    for another pod's address, or a router advertisement, is dropped before the node sees it."""
    attacker, server = pod(lab, "attacker"), pod(lab, "server")
    assert udp_echoed(lab, "friend", address(lab, "friend", 6), 45200)
    send(lab, "attacker", "neighbour-advert", "--src", attacker.ip6, "--dst", "ff02::1", "--target", server.ip6)
    wait_for_drop(lab, "Forbidden ICMPv6 message")
    before = recent_drop_reasons(lab).count("Forbidden ICMPv6 message")
    send(lab, "attacker", "router-advert", "--src", "fe80::bad", "--dst", "ff02::1")
    wait_until(lambda: recent_drop_reasons(lab).count("Forbidden ICMPv6 message") > before,
               "a drop of the router advertisement", timeout_s=5)  # fmt: skip


@FAMILIES
def test_an_icmp_error_passes_only_for_a_tracked_flow_between_the_same_two_ends(lab: Lab, family: int) -> None:
    """Errors of allowed flows pass (path MTU discovery needs them) though the server's policy allows no ICMP:
    friend's port-unreachable about the server's echo on friend's tracked flow reaches the server. The
    attacker's error (from its own address, so past the source check) is decided by policy and dropped,
    whether it carries friend's flow or one of its own that was never opened."""
    friend, server, attacker = (address(lab, name, family) for name in ("friend", "server", "attacker"))
    proto = "58" if family == 6 else "1"
    assert udp_echoed(lab, "friend", friend, 46000)  # friend:46000 <-> server:5353 is tracked

    def error_reaches_server(sender: str, source: str, inner_destination: str, inner_dport: int) -> bool:
        with watching(lab, "server", 1.5, proto=proto, src=source, dst=server) as seen:
            send(lab, sender, "icmp-error", "--src", source, "--dst", server, "--inner-src", server,
                 "--inner-dst", inner_destination, "--sport", "5353", "--dport", str(inner_dport))  # fmt: skip
        return seen[0]

    assert error_reaches_server("friend", friend, friend, 46000)
    assert not error_reaches_server("attacker", attacker, friend, 46000)
    assert not error_reaches_server("attacker", attacker, attacker, 46000)
    wait_for_drop(lab, "Policy denied")


def test_tagged_frames_into_a_pod_are_dropped(lab: Lab) -> None:
    server = pod(lab, "server")
    with watching(lab, "server", 1.5, proto="udp", dport=5355) as seen:
        send_into_pod(lab, "server", "udp", "--src", "10.99.0.1", "--dst", server.ip, "--dport", "5355",
                      "--vlan", "0x8100:0")  # fmt: skip
    assert not seen[0]


# A client that keeps one connection open: a request on it whenever a line arrives on stdin, one line out each.
KEEPALIVE_CLIENT = """
import http.client, sys
connection = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=3)
for line in sys.stdin:
    try:
        connection.request("GET", line.strip())
        response = connection.getresponse()
        response.read()
        print(response.status, flush=True)
    except (OSError, http.client.HTTPException) as error:
        print(type(error).__name__, flush=True)
        break
"""


def test_an_open_connection_on_a_port_that_became_l7_does_not_reach_the_backend(lab: Lab, policies: Path) -> None:
    client = subprocess.Popen(
        lab.exec_command("friend", [sys.executable, "-c", KEEPALIVE_CLIENT, "server", "9000"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write("/secret\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "200"  # L4 allow: straight to the backend
        install(lab, policies, L4_ALLOWS + PORT_9000_L7)
        client.stdin.write("/secret\n")
        client.stdin.flush()
        answer = client.stdout.readline().strip()
        assert not answer.startswith("2"), f"the open connection reached the backend after the change: {answer}"
    finally:
        client.kill()
        client.communicate()
    # A new connection goes through Envoy, which applies the new rule.
    assert http_status(lab, "friend", 9000, "/secret") == "403"
    assert http_status(lab, "friend", 9000, "/public") == "200"


def http_status(lab: Lab, source: str, port: int, path: str) -> str:
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", f"http://server:{port}{path}"]
    return subprocess.run(lab.exec_command(source, command), capture_output=True, text=True, timeout=30).stdout


# An open TCP connection to the echo port, and a UDP flow: a line on each whenever one arrives on stdin; prints
# whether each came back.
FLOWS_CLIENT = """
import socket, sys
tcp = socket.create_connection(("server", 5432), timeout=1)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.connect(("server", 5353))
udp.settimeout(1)
for line in sys.stdin:
    results = []
    for sock in (tcp, udp):
        try:
            sock.send(line.encode())
            results.append("ok" if sock.recv(100) == line.encode() else "wrong")
        except OSError as error:
            results.append(type(error).__name__)
    print(" ".join(results), flush=True)
"""


def test_open_tcp_and_udp_flows_stop_once_their_allow_is_removed(lab: Lab, policies: Path) -> None:
    client = subprocess.Popen(
        lab.exec_command("friend", [sys.executable, "-c", FLOWS_CLIENT]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write("one\n")
        client.stdin.flush()
        assert client.stdout.readline().split() == ["ok", "ok"]
        install(lab, policies, PORT_9000_L4)  # 5432 and 5353 no longer allowed
        client.stdin.write("two\n")
        client.stdin.flush()
        tcp, udp = client.stdout.readline().split()
        assert tcp != "ok" and udp != "ok", (tcp, udp)
    finally:
        client.kill()
        client.communicate()
    wait_for_drop(lab, "Policy denied")


def conntrack(lab: Lab) -> list[dict[str, object]]:
    code, body = agent_get(lab.agent_socket, "/v1/bpf/ct")
    assert code == 200, body
    flows: list[dict[str, object]] = json.loads(body)
    return flows


def test_udp_flows_expire_and_the_collector_removes_them(lab: Lab) -> None:
    server, friend = pod(lab, "server").ip, pod(lab, "friend").ip
    flow = {"source": f"{friend}:43000", "destination": f"{server}:5353", "protocol": socket.IPPROTO_UDP}
    script = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 43000)); "
        f"s.settimeout(1.5); s.sendto(b'hello', ('{server}', 5353)); print(s.recv(100))"
    )
    subprocess.run(lab.exec_command("friend", [sys.executable, "-c", script]), check=True, timeout=30)
    opened = time.monotonic()

    def tracked() -> bool:
        return any({key: entry[key] for key in flow} == flow for entry in conntrack(lab))

    assert tracked()
    # While the flow lives, a datagram from the server to the friend's port is its reply and passes (the
    # friend's ingress is default-deny: it would not pass as a flow of its own).
    with watching(lab, "friend", 1.5, proto="udp", src=server, sport=5353, dport=43000) as seen:
        send(lab, "server", "udp", "--src", server, "--dst", friend, "--sport", "5353", "--dport", "43000")
    assert seen[0], "a reply within the UDP timeout passes"
    # Gone from the table after the timeout, once the collector ran (every second).
    wait_until(lambda: not tracked(), "the collector to remove the expired flow", timeout_s=UDP_TIMEOUT_S + 5)
    assert time.monotonic() - opened >= UDP_TIMEOUT_S - 1
    with watching(lab, "friend", 1.5, proto="udp", src=server, sport=5353, dport=43000) as seen:
        send(lab, "server", "udp", "--src", server, "--dst", friend, "--sport", "5353", "--dport", "43000")
    assert not seen[0], "after expiry the same datagram is a new flow, which the friend's policy denies"
