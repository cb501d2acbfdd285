"""Acceptance of the billing-api slice, through the real kernel and the real Envoy."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from sidecarless.api.client import agent_status
from sidecarless.lab.node import Lab
from sidecarless.lab.scenario import run_scenario
from tests.e2e.conftest import BILLING, assert_ran_in_both_families, http, lab_name, status_code, tcp_echo, write_policy

LISTENER_CONNECTIONS = "listener.[__]_15001.downstream_cx_total"  # [::]:15001, both families


def test_billing_api_table_row_for_row() -> None:
    lines: list[str] = []
    outcomes = run_scenario(BILLING, lab_name("table"), report=lines.append)
    failed = [outcome.line() for outcome in outcomes if not outcome.passed]
    assert not failed, "\n".join(lines)
    assert len(outcomes) == 44  # the table's 22 cases, over IPv4 and over IPv6
    assert_ran_in_both_families(outcomes)


def test_billing_api_table_over_delta_xds() -> None:
    lines: list[str] = []
    outcomes = run_scenario(BILLING, lab_name("delta"), report=lines.append, agent_options=("--xds-mode", "delta"))
    assert outcomes and all(outcome.passed for outcome in outcomes), "\n".join(lines)


def test_5432_never_reaches_envoy(billing_lab: Lab) -> None:
    billing_lab.apply(BILLING / "policies-with-5432")
    try:
        before = billing_lab.envoy_stat(LISTENER_CONNECTIONS)
        assert tcp_echo(billing_lab, "finance-batch", 5432)
        assert not tcp_echo(billing_lab, "dev-tool", 5432)
        assert not tcp_echo(billing_lab, "prometheus", 5432)
        assert billing_lab.envoy_stat(LISTENER_CONNECTIONS) == before
        # The counter does move for the L7 port: the assertion above can fail.
        assert status_code(billing_lab, "prometheus", "GET", "/metrics") == "200"
        assert billing_lab.envoy_stat(LISTENER_CONNECTIONS) == before + 1
    finally:
        billing_lab.apply(BILLING / "policies")


def test_backend_sees_the_original_request(billing_lab: Lab) -> None:
    result = http(billing_lab, "prometheus", "GET", "/metrics?name=x")
    body, _, code = result.stdout.rpartition("\n")
    assert code == "200"
    received = json.loads(body)
    assert (received["method"], received["path"], received["query"]) == ("GET", "/metrics", "name=x")
    assert received["server"] == "production/billing-api"
    result = http(billing_lab, "finance-batch", "POST", "/api/v1/invoices/export")
    body, _, code = result.stdout.rpartition("\n")
    assert code == "200"
    assert (json.loads(body)["method"], json.loads(body)["path"]) == ("POST", "/api/v1/invoices/export")


KEEPALIVE_CLIENT = """
import http.client, sys
connection = http.client.HTTPConnection("billing-api", 8080, timeout=5)
def get(path):
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    return response.status
first = get("/metrics")
port = connection.sock.getsockname()[1]
print(first, flush=True)
sys.stdin.readline()
statuses = [get("/metrics"), get("/healthz")]
assert connection.sock.getsockname()[1] == port, "reconnected"
print(*statuses, flush=True)
"""


def test_apply_changes_verdicts_on_an_open_keepalive_connection(billing_lab: Lab, tmp_path: Path) -> None:
    before = billing_lab.status()
    client = subprocess.Popen(
        billing_lab.exec_command("prometheus", [sys.executable, "-c", KEEPALIVE_CLIENT]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "200"
        changed = (BILLING / "policies" / "billing-api.yaml").read_text().replace("path: /metrics", "path: /healthz")
        write_policy(tmp_path, "billing-api.yaml", changed)
        assert billing_lab.apply(tmp_path) == []
        client.stdin.write("go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=10)
        assert client.returncode == 0, err
        assert out.split() == ["403", "200"]
    finally:
        if client.poll() is None:
            client.kill()
        billing_lab.apply(BILLING / "policies")
    after = billing_lab.status()
    assert after["agent"]["pid"] == before["agent"]["pid"]
    assert after["envoy"]["pid"] == before["envoy"]["pid"] and after["envoy"]["restarts"] == 0


def test_bad_policy_file_is_rejected_and_the_policy_in_force_kept(billing_lab: Lab, tmp_path: Path) -> None:
    broken = (BILLING / "policies" / "billing-api.yaml").read_text().replace("method: GET", "method: HEAD")
    broken = broken.replace(
        '    toPorts:\n    - ports: [{port: "8080", protocol: TCP}]\n      rules: {http: [{method: POST',
        '    toPort:\n    - ports: [{port: "8080", protocol: TCP}]\n      rules: {http: [{method: POST',
    )
    write_policy(tmp_path, "billing-api.yaml", broken)
    try:
        errors = billing_lab.apply(tmp_path)
        assert errors == [
            f"{tmp_path}/billing-api.yaml:12: spec.ingress[1].toPort: unknown field "
            "(known: fromCIDR, fromCIDRSet, fromEndpoints, fromEntities, toPorts)"
        ]
        # The HEAD change in the same file did not take effect: the whole file was rejected.
        assert status_code(billing_lab, "prometheus", "GET", "/metrics") == "200"
        assert status_code(billing_lab, "prometheus", "POST", "/metrics") == "403"
        assert status_code(billing_lab, "finance-batch", "POST", "/api/v1/invoices/export") == "200"
        status = agent_status(billing_lab.agent_socket)
        (rejected_file,) = status["policies"]["rejected"]
        assert rejected_file.endswith("billing-api.yaml")
        assert status["policies"]["in_force"] == ["production/billing-api-l7-policy"]
    finally:
        billing_lab.apply(BILLING / "policies")


def test_dropped_connection_is_reported_with_identities(billing_lab: Lab) -> None:
    assert status_code(billing_lab, "dev-tool", "GET", "/metrics") == "dropped"
    status = agent_status(billing_lab.agent_socket)
    pods = {pod["name"]: pod["ip"] for pod in billing_lab.read_state()["pods"]}
    drops = [
        d for d in status["recent_drops"]
        if (d["destination"]["ip"], d["destination"]["port"]) == (pods["billing-api"], 8080)
        and d["source"]["ip"] == pods["dev-tool"]
    ]  # fmt: skip
    assert drops, status["recent_drops"]
    assert drops[-1]["reason"] == "Policy denied" and drops[-1]["source"]["name"] == "production/dev-tool"
    assert drops[-1]["source"]["identity"] >= 256 and drops[-1]["destination"]["identity"] >= 256
    assert status["datapath"]["counters"]["dropped"] >= 1


def test_lab_cli_status_and_exec(billing_lab: Lab) -> None:
    command = [sys.executable, "-m", "sidecarless", "lab"]
    status = subprocess.run([*command, "status", "--name", billing_lab.name, "-o", "json"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    document = json.loads(status.stdout)
    assert document["agent"]["ready"] is True and document["agent"]["pid"] > 0
    assert document["envoy"]["pid"] > 0
    assert {pod["name"] for pod in document["pods"]} == {
        "billing-api",
        "prometheus",
        "finance-batch",
        "dev-tool",
    }
    assert all(pod["ip"].startswith("10.244.") and pod["interface"] for pod in document["pods"])
    exit_code = subprocess.run([*command, "exec", "--name", billing_lab.name, "dev-tool", "--", "sh", "-c", "exit 7"])
    assert exit_code.returncode == 7


def test_lab_down_removes_everything_also_after_a_crash() -> None:
    lab = Lab(lab_name("crash"))
    try:
        lab.up(BILLING / "pods.yaml", BILLING / "policies")
        state = lab.read_state()
        envoy_pid, agent_pid = lab.status()["envoy"]["pid"], lab.agent_pid()
        servers = [p["server_pid"] for p in state["pods"] if p["server_pid"]]
        supervisor = lab.supervisor_pid()
        assert supervisor is not None and agent_pid is not None
        pids = [supervisor, agent_pid, envoy_pid, *servers]
        # A crash: supervisor and agent gone at once; Envoy and the servers are left behind.
        os.kill(supervisor, signal.SIGKILL)
        os.kill(agent_pid, signal.SIGKILL)
    finally:
        lab.down()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"scl-{lab.name}-" not in namespaces
    assert not Path(lab.pin_dir).exists()
    assert not lab.dir.exists()
    assert not list(Path("/etc/netns").glob(f"scl-{lab.name}-*"))
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]


SAME_CONNECTION_CLIENT = """
import http.client
connection = http.client.HTTPConnection("billing-api", 8080, timeout=5)
statuses = []
for method, path in [("POST", "/metrics"), ("GET", "/metrics"), ("GET", "/api/v1/invoices/export"), ("GET", "/metrics")]:
    connection.request(method, path)
    response = connection.getresponse()
    response.read()
    statuses.append(response.status)
    if connection.sock is None:
        raise SystemExit("the proxy closed the connection after " + path)
print(*statuses)
"""


def test_a_403_keeps_the_connection_and_later_requests_get_their_own_verdict(billing_lab: Lab) -> None:
    result = subprocess.run(
        billing_lab.exec_command("prometheus", [sys.executable, "-c", SAME_CONNECTION_CLIENT]),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.split() == ["403", "200", "403", "200"]


def test_http2_prior_knowledge_is_policed_and_reaches_the_backend_as_http2(billing_lab: Lab) -> None:
    def h2(method: str, path: str) -> subprocess.CompletedProcess[str]:
        command = ["curl", "-sS", "--http2-prior-knowledge", "-X", method, "--max-time", "5",
                   "-w", "\n%{http_code} %{http_version}", f"http://billing-api:8080{path}"]  # fmt: skip
        return subprocess.run(billing_lab.exec_command("prometheus", command), capture_output=True, text=True)

    allowed = h2("GET", "/metrics")
    body, _, status = allowed.stdout.rpartition("\n")
    assert status == "200 2"
    assert json.loads(body)["http_version"] == "2"
    assert h2("POST", "/metrics").stdout.rpartition("\n")[2] == "403 2"


def test_a_directory_of_broken_files_leaves_the_policies_in_force(billing_lab: Lab, tmp_path: Path) -> None:
    from tests.unit.test_policy_validate import write_broken_files

    expected = write_broken_files(tmp_path)
    shutil.copy(BILLING / "policies" / "billing-api.yaml", tmp_path / "billing-api.yaml")
    try:
        errors = billing_lab.apply(tmp_path)
        assert [error.split(": ", 1)[0] for error in errors] == [f"{tmp_path}/{name}:{line}" for name, line in expected]
        assert status_code(billing_lab, "prometheus", "GET", "/metrics") == "200"
        assert status_code(billing_lab, "prometheus", "POST", "/metrics") == "403"
        assert status_code(billing_lab, "dev-tool", "GET", "/metrics") == "dropped"
    finally:
        billing_lab.apply(BILLING / "policies")


def test_the_node_reaches_its_pods_whatever_the_policy(billing_lab: Lab) -> None:
    # As kubelet probes do: from the node namespace, to a pod in ingress default deny, on any port.
    for port in (8080, 5432):
        command = [
            "ip",
            "netns",
            "exec",
            billing_lab.node_netns,
            "nc",
            "-z",
            "-w",
            "2",
            "10.244.1.10",
            str(port),
        ]
        assert subprocess.run(command, capture_output=True).returncode == 0, port
