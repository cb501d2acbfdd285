"""Socket acceleration (bpf/sockets.bpf.c, `--sockmap-cgroup`): data of a connection between two sockets of the
node goes socket to socket, past the stacks and the TC programs, only while the kernel policy that let the flow
through still holds; a policy change puts it back on the stack, where it is decided again. Every test checks
that its connections were accelerated (the pairing counters), else it would prove nothing, and each is tried
the way a pod with CAP_NET_RAW would try it.

The hostile-pod lab (test_hostile_pod.py: server, friend, attacker in `shop`), here with sockmap on
(test_hostile_pod.py runs it without)."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecarless.api.client import agent_status
from sidecarless.lab.node import Lab
from sidecarless.lab.topology import cgroup2_root
from sidecarless.redirect.bpf import detach_socket_programs
from sidecarless.redirect.bpf_syscall import (
    BPF_CGROUP_SOCK_OPS,
    attached_program_ids,
    object_pin,
    program_attach,
    program_detach,
    program_id,
    program_load,
)
from tests.e2e.conftest import wait_until, write_policy
from tests.e2e.test_hostile_pod import (
    FAMILIES,
    KEEPALIVE_CLIENT,
    L4_ALLOWS,
    PORT_9000_L4,
    PORT_9000_L7,
    address,
    install,
    pod,
    shop_lab,
    wait_for_drop,
)

FRIEND_EGRESS_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: friend-egress, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: friend}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "9000", protocol: TCP}]
      rules: {http: [{method: GET, path: /public}]}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with shop_lab(tmp_path_factory.mktemp("sockmap"), "sockmap", sockmap=True) as lab:
        yield lab


@pytest.fixture
def policies(lab: Lab, tmp_path: Path) -> Iterator[Path]:
    """A policy directory the test may change; the lab's first policies are back in force afterwards."""
    yield tmp_path / "policies"
    install(lab, tmp_path / "restored", L4_ALLOWS + PORT_9000_L4)


def counters(lab: Lab) -> dict[str, int]:
    found: dict[str, int] = agent_status(lab.agent_socket)["datapath"]["counters"]
    return found


def paired(lab: Lab) -> int:
    return counters(lab)["sockets_paired"]


class PodScript:
    """A Python script in a pod (and in its node's cgroup, where sockets are accelerated): a line in, a line out."""

    def __init__(self, lab: Lab, pod_name: str, script: str, *arguments: str) -> None:
        self.process = subprocess.Popen(
            lab.exec_command(pod_name, [sys.executable, "-c", script, *arguments]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def ask(self, line: str | None) -> str:
        """Its next line of output, after sending `line` (None: nothing)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        if line is not None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        if not answer:
            assert self.process.stderr is not None
            self.process.kill()
            raise AssertionError(f"the script in the pod ended: {self.process.stderr.read()[-2000:]}")
        return answer

    def close(self) -> None:
        self.process.kill()
        self.process.communicate()


# One TCP connection to the echo port; each line in asks for that many bytes sent and echoed (sent from a
# thread while the answer is read), and prints whether what came back is what was sent, byte for byte.
ECHO_CLIENT = """
import hashlib, os, socket, sys, threading
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
connection = socket.socket(family, socket.SOCK_STREAM)
connection.settimeout(3)
connection.connect((sys.argv[1], 5432))
for line in sys.stdin:
    payload = os.urandom(int(line))
    sender = threading.Thread(target=connection.sendall, args=(payload,))
    sender.start()
    received = bytearray()
    try:
        while len(received) < len(payload):
            chunk = connection.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        print("same" if hashlib.sha256(received).digest() == hashlib.sha256(payload).digest() else
              f"different ({len(received)} of {len(payload)} bytes)", flush=True)
    except OSError as error:
        print(type(error).__name__, flush=True)
    sender.join(timeout=5)
"""


@FAMILIES
def test_an_allowed_flow_is_accelerated_and_carries_every_byte_in_order(lab: Lab, family: int) -> None:
    before = paired(lab)
    client = PodScript(lab, "friend", ECHO_CLIENT, address(lab, "server", family))
    try:
        assert client.ask("10") == "same"
        # Both ends of the one connection, once the server's end is established.
        wait_until(lambda: paired(lab) - before >= 2, "both sockets of the connection paired")
        for size in ("1", "65536", "4000000"):
            assert client.ask(size) == "same", size
    finally:
        client.close()


def test_a_denied_flow_is_never_accelerated(lab: Lab) -> None:
    before = paired(lab)
    command = ["nc", "-N", "-w", "2", "server", "5432"]
    result = subprocess.run(lab.exec_command("attacker", command), input="x\n", capture_output=True, text=True)
    assert result.stdout == ""
    assert paired(lab) == before


@FAMILIES
def test_an_accelerated_flow_stops_once_its_allow_is_removed(lab: Lab, policies: Path, family: int) -> None:
    client = PodScript(lab, "friend", ECHO_CLIENT, address(lab, "server", family))
    try:
        before = paired(lab)
        assert client.ask("100") == "same"
        wait_until(lambda: paired(lab) - before >= 2, "both sockets of the connection paired")
        unpaired = counters(lab)["sockets_unpaired"]
        install(lab, policies, PORT_9000_L4)  # 5432 no longer allowed
        answer = client.ask("100")
        assert answer != "same", "the accelerated connection still carried data after its allow was removed"
        assert counters(lab)["sockets_unpaired"] > unpaired
    finally:
        client.close()
    wait_for_drop(lab, "Policy denied")


def test_an_accelerated_connection_on_a_port_that_became_l7_does_not_reach_the_backend(
    lab: Lab, policies: Path
) -> None:
    before = paired(lab)
    client = PodScript(lab, "friend", KEEPALIVE_CLIENT, "server", "9000")
    try:
        assert client.ask("/secret") == "200"  # L4 allow: straight to the backend, socket to socket
        wait_until(lambda: paired(lab) - before >= 2, "both sockets of the connection paired")
        install(lab, policies, L4_ALLOWS + PORT_9000_L7)
        answer = client.ask("/secret")
        assert not answer.startswith("2"), f"the open connection reached the backend after the change: {answer}"
    finally:
        client.close()


def test_every_request_of_an_accelerated_connection_meets_the_l7_rule(lab: Lab, policies: Path) -> None:
    install(lab, policies, L4_ALLOWS + PORT_9000_L7)
    before = paired(lab)
    client = PodScript(lab, "friend", KEEPALIVE_CLIENT, "server", "9000")
    try:
        assert client.ask("/public") == "200"
        # The client's socket and the proxy's accepted one; the proxy's upstream and the server's.
        wait_until(lambda: paired(lab) - before >= 4, "the sockets of both legs paired")
        assert [client.ask(path) for path in ("/secret", "/public", "/secret")] == ["403", "200", "403"]
    finally:
        client.close()


# The friend's egress L7 rule: the proxy opens its upstream connection from the friend's own address. Keeps one
# connection through the proxy (K), then opens a second one from the port the proxy's upstream connection has,
# so its four addresses are those of the proxy's upstream socket (X). Prints K's and X's answers.
TUPLE_REUSE_CLIENT = """
import http.client, socket, sys
server, friend = sys.argv[1], sys.argv[2]
kept = http.client.HTTPConnection(server, 9000, timeout=3)

def ask(connection, path):
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__

print(ask(kept, "/public"), flush=True)
port = int(sys.stdin.readline())
reused = http.client.HTTPConnection(server, 9000, timeout=3, source_address=(friend, port))
print(ask(reused, "/secret"), ask(reused, "/public"), ask(kept, "/secret"), flush=True)
"""


def proxy_upstream_ports(lab: Lab, source: str, destination: str) -> list[int]:
    """The local ports of the node's established connections from `source` to `destination` (the proxy's
    upstream connections, which carry the pod's address)."""
    listing = subprocess.run(
        ["ip", "netns", "exec", lab.node_netns, "ss", "-tnH", "state", "established", "src", source, "dst", destination],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [int(line.split()[2].rpartition(":")[2]) for line in listing.splitlines() if line.strip()]


def test_a_pod_reusing_the_proxys_upstream_addresses_is_paired_with_the_proxy_not_the_server(
    lab: Lab, policies: Path
) -> None:
    """The proxy's upstream socket and a socket the pod opens itself can have the same four addresses: a key
    that did not say which side a socket lives on would pair the pod's socket with the server's, past the proxy."""
    write_policy(policies, "friend-egress.yaml", FRIEND_EGRESS_L7)
    install(lab, policies, L4_ALLOWS + PORT_9000_L4)
    server, friend = pod(lab, "server").ip, pod(lab, "friend").ip
    before = paired(lab)
    client = PodScript(lab, "friend", TUPLE_REUSE_CLIENT, server, friend)
    try:
        assert client.ask(None) == "200"
        upstream: list[int] = []
        wait_until(lambda: upstream.extend(proxy_upstream_ports(lab, friend, f"{server}:9000")) or upstream,
                   "the proxy's upstream connection from the friend's address")  # fmt: skip
        assert paired(lab) - before >= 4, "the connection's sockets were not accelerated"
        reused_secret, reused_public, kept_secret = client.ask(str(upstream[0])).split()
    finally:
        client.close()
    assert reused_secret == "403", f"a request on the reused addresses went past the proxy: {reused_secret}"
    assert reused_public == "200"
    assert not kept_secret.startswith("2"), kept_secret


BPF_PROG_TYPE_SOCK_OPS = 13
RETURN_1 = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 1; exit


def test_uninstall_leaves_another_owners_sock_ops_program_in_place() -> None:
    """`datapath uninstall --sockmap-cgroup` takes off only a program sidecarless pinned: on a cgroup it shares
    with another owner (Cilium attaches at the node's cgroup2 root), that owner's program stays, also when it
    replaced sidecarless's. (Two trivial sock_ops programs: one pinned where the agent pins its own.)"""
    pins = Path(f"/sys/fs/bpf/scl-test-foreign-{os.getpid()}")  # bpffs: where programs can be pinned
    pinned = pins / "maps-x" / "programs-y" / "scl_sock_ops"
    pinned.parent.mkdir(parents=True)
    cgroup = cgroup2_root() / f"sidecarless-test-foreign-{os.getpid()}"
    cgroup.mkdir()
    fds: list[int] = []
    try:
        directory, ours, foreign = (os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY),
                                    program_load(BPF_PROG_TYPE_SOCK_OPS, "ours", RETURN_1),
                                    program_load(BPF_PROG_TYPE_SOCK_OPS, "foreign", RETURN_1))  # fmt: skip
        fds += [directory, ours, foreign]
        object_pin(ours, str(pinned))
        program_attach(directory, foreign, BPF_CGROUP_SOCK_OPS)  # another owner's, in place of ours
        done = detach_socket_programs(str(pins), str(cgroup))
        assert done == [f"left sock_ops program {program_id(foreign)} on {cgroup}: not sidecarless's"], done
        assert attached_program_ids(directory, BPF_CGROUP_SOCK_OPS) == [program_id(foreign)]
        program_attach(directory, ours, BPF_CGROUP_SOCK_OPS)  # ours again: taken off
        assert detach_socket_programs(str(pins), str(cgroup)) == [f"detached socket acceleration from {cgroup}"]
        assert attached_program_ids(directory, BPF_CGROUP_SOCK_OPS) == []
    finally:
        if fds:
            with contextlib.suppress(OSError):
                program_detach(fds[0], 0, BPF_CGROUP_SOCK_OPS)
        for fd in fds:
            os.close(fd)
        shutil.rmtree(pins)
        cgroup.rmdir()
