"""Faults sidecarless must survive (issue 4), each in a lab: Envoy killed, agent killed, Envoy NACK, bad
policy input, policy churn under load, clean shutdown and uninstall, and what pods may not reach."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecarless.api.client import agent_get, agent_status
from sidecarless.envoy.process import process_alive
from sidecarless.lab.node import Lab
from tests.e2e.conftest import BILLING, lab_name, status_code, tcp_echo, write_policy

SHOP = Path(__file__).resolve().parents[1] / "scenarios"
DEADLINE_S = 15.0


def wait_until(condition, what: str, timeout_s: float = DEADLINE_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def billing_5432_lab() -> Iterator[Lab]:
    lab = Lab(lab_name("fault"))
    try:
        lab.up(BILLING / "pods.yaml", BILLING / "policies-with-5432")
        yield lab
    finally:
        lab.down()


# A client in a pod: requests in a loop for `seconds`, one JSON line per request with its time and result.
LOOP_CLIENT = """
import http.client, json, socket, sys, time
method, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.time() + seconds
while time.time() < end:
    started = time.time()
    try:
        connection = http.client.HTTPConnection("billing-api", 8080, timeout=0.5)
        connection.request(method, path)
        result = connection.getresponse().status
        connection.close()
    except (OSError, http.client.HTTPException) as error:
        result = type(error).__name__
    print(json.dumps({"t": started, "result": result}), flush=True)
    time.sleep(0.02)
"""

# An established TCP connection on an L4 port: a line every 50 ms, each echoed, for `seconds`.
ECHO_CLIENT = """
import socket, sys, time
seconds = float(sys.argv[1])
connection = socket.create_connection(("billing-api", 5432), timeout=2)
end, count = time.time() + seconds, 0
while time.time() < end:
    line = f"line {count}\\n".encode()
    connection.sendall(line)
    received = b""
    while len(received) < len(line):
        received += connection.recv(len(line) - len(received))
    assert received == line, received
    count += 1
    time.sleep(0.05)
print(count)
"""


def in_pod(lab: Lab, pod: str, script: str, *arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        lab.exec_command(pod, [sys.executable, "-c", script, *arguments]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def results(process: subprocess.Popen[str]) -> list[dict[str, object]]:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def envoy_pids(lab: Lab) -> list[int]:
    """Envoy processes in the lab's node namespace."""
    pids = subprocess.run(
        ["ip", "netns", "pids", lab.node_netns], capture_output=True, text=True
    ).stdout.split()
    found = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"envoy-bootstrap.json" in command and process_alive(int(pid)):
            found.append(int(pid))
    return found


def test_envoy_killed_fails_closed_and_recovers_within_2s(billing_5432_lab: Lab) -> None:
    lab = billing_5432_lab
    envoy = lab.status()["envoy"]["pid"]
    denied = in_pod(lab, "prometheus", LOOP_CLIENT, "POST", "/metrics", "4")
    allowed = in_pod(lab, "prometheus", LOOP_CLIENT, "GET", "/metrics", "4")
    l4 = in_pod(lab, "finance-batch", ECHO_CLIENT, "4")
    time.sleep(1.0)  # the clients run before, during and after the kill
    killed_at = time.time()
    os.kill(envoy, signal.SIGKILL)
    denied_results, allowed_results = results(denied), results(allowed)
    out, err = l4.communicate(timeout=60)
    # L4-only traffic is untouched: the established connection echoed every line through the outage.
    assert l4.returncode == 0, err
    assert int(out) > 40
    # Never forwarded unchecked: a denied request is refused, dropped or 403, never 200.
    assert all(r["result"] != 200 for r in denied_results), denied_results
    assert any(r["result"] == 403 for r in denied_results)
    # Correct again within 2 s of the kill, and from then on.
    after = [r for r in allowed_results if float(r["t"]) > killed_at + 2.0]  # type: ignore[arg-type]
    assert after and all(r["result"] == 200 for r in after), allowed_results
    status = lab.status()
    assert status["envoy"]["pid"] != envoy and status["envoy"]["restarts"] >= 1 and status["agent"]["ready"]


def test_agent_killed_datapath_and_envoy_keep_enforcing_and_are_adopted(billing_5432_lab: Lab) -> None:
    lab = billing_5432_lab
    before = lab.status()
    (envoy,) = envoy_pids(lab)
    assert before["envoy"]["pid"] == envoy
    l4 = in_pod(lab, "finance-batch", ECHO_CLIENT, "5")
    requests = in_pod(lab, "prometheus", LOOP_CLIENT, "GET", "/metrics", "5")
    time.sleep(1.0)
    os.kill(before["agent"]["pid"], signal.SIGKILL)
    # While the agent is away: L3/L4 drops, the redirect and L7 verdicts hold.
    assert status_code(lab, "dev-tool", "GET", "/metrics") == "dropped"
    assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
    assert lab.agent_pid() is None or lab.agent_pid() != before["agent"]["pid"]
    lines, err = l4.communicate(timeout=60)
    assert l4.returncode == 0, err  # the established TCP connection carried data before, during and after
    assert int(lines) > 60
    assert all(r["result"] == 200 for r in results(requests))
    wait_until(lambda: lab.status()["agent"]["ready"], "the restarted agent to be ready")
    after = lab.status()
    assert after["agent"]["pid"] != before["agent"]["pid"] and after["agent"]["starts"] == 2
    assert envoy_pids(lab) == [envoy]  # adopted: no second Envoy
    assert agent_status(lab.agent_socket)["envoy"]["adopted"] is True
    # It reconciles to the current policy: a change made while it was away is enforced.
    changed = (
        (BILLING / "policies-with-5432" / "billing-api.yaml")
        .read_text()
        .replace("method: GET", "method: HEAD")
    )
    directory = Path(lab.dir) / "changed"
    write_policy(directory, "billing-api.yaml", changed)
    lab.apply(directory)
    assert status_code(lab, "prometheus", "GET", "/metrics") == "403"
    assert tcp_echo(lab, "finance-batch", 5432)


NACK_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: /a}]}
"""
# A second port whose path regex is within what `policy validate` accepts (Envoy's default limit) but over
# the limit this lab's Envoy runs with: Envoy rejects its routes.
NACK_EXTRA = """  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "9000", protocol: TCP}]
      rules: {http: [{method: GET, path: "/reports/(daily|weekly|monthly)/[0-9]+"}]}
"""


def test_envoy_nack_is_not_resent_keeps_the_last_good_and_does_not_redirect(tmp_path: Path) -> None:
    lab = Lab(lab_name("nack"))
    write_policy(tmp_path / "good", "api.yaml", NACK_POLICY)
    write_policy(tmp_path / "bad", "api.yaml", NACK_POLICY + NACK_EXTRA)
    try:
        lab.up(
            SHOP / "pods.yaml", tmp_path / "good", ("--envoy-runtime", "re2.max_program_size.error_level=20")
        )
        assert status_code_shop(lab, "GET", 8080, "/a") == "200"
        with pytest.raises(Exception, match="rejected"):
            lab.apply(tmp_path / "bad", timeout_s=5)
        status = agent_status(lab.agent_socket)
        message = status["xds"]["route"]["rejected"]
        assert message and "program size" in message  # Envoy's own words
        sent = status["xds"]["route"]["responses"]
        time.sleep(1.0)  # a resend loop would show at once; absence has no event to wait for
        assert agent_status(lab.agent_socket)["xds"]["route"]["responses"] == sent
        # The last good configuration stays in force on 8080; 9000's redirect is never switched on.
        assert status_code_shop(lab, "GET", 8080, "/a") == "200"
        assert status_code_shop(lab, "GET", 8080, "/b") == "403"
        assert status_code_shop(lab, "GET", 9000, "/reports/daily/1") == "dropped"
        _, metrics = agent_get(lab.agent_socket, "/metrics")
        assert 'sidecarless_xds_nacks_total{type="route"} 1.0' in metrics
        assert "program size" in (lab.dir / "agent.log").read_text()
        # Fixed: applied.
        lab.apply(tmp_path / "good")
        assert agent_status(lab.agent_socket)["xds"]["route"]["rejected"] is None
    finally:
        lab.down()


def status_code_shop(lab: Lab, method: str, port: int, path: str) -> str:
    command = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "--connect-timeout", "1",
               "--max-time", "3", f"http://api:{port}{path}"]  # fmt: skip
    result = subprocess.run(lab.exec_command("client", command), capture_output=True, text=True)
    return "dropped" if result.returncode == 28 else result.stdout


def test_pods_cannot_reach_the_proxy_ports_or_envoy_admin(billing_5432_lab: Lab) -> None:
    lab = billing_5432_lab
    for port in (15001, 15002):
        command = ["nc", "-z", "-w", "1", "10.244.0.1", str(port)]
        assert subprocess.run(lab.exec_command("prometheus", command), capture_output=True).returncode != 0, (
            port
        )
    # In the node namespace only Envoy's proxy listeners listen on TCP; admin and xDS are Unix sockets.
    listening = subprocess.run(
        ["ip", "netns", "exec", lab.node_netns, "ss", "-Hltn"], capture_output=True, text=True
    ).stdout.split("\n")
    ports = sorted({line.split()[3].rsplit(":", 1)[1] for line in listening if line.strip()})
    assert ports == ["15001"], listening
    for name in ("xds.sock", "agent.sock"):
        assert oct((lab.agent_dir / name).stat().st_mode & 0o777) == "0o660", name
