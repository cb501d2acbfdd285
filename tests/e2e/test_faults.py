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
from sidecarless.redirect.bpf_syscall import BPF_CGROUP_SOCK_OPS, attached_program_ids
from tests.e2e.conftest import BILLING, billing, lab_name, status_code, tcp_echo, wait_until, write_policy

SHOP = Path(__file__).resolve().parents[1] / "scenarios"


@pytest.fixture
def billing_5432_lab() -> Iterator[Lab]:
    with billing("fault", "policies-with-5432") as lab:
        yield lab


@pytest.fixture(params=["sotw", "delta"])
def xds_mode_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The billing lab with 5432 open to finance-batch, its Envoy on state-of-the-world or delta xDS."""
    with billing(f"fault-{request.param}", "policies-with-5432", ("--xds-mode", request.param)) as lab:
        yield lab


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
    pids = subprocess.run(["ip", "netns", "pids", lab.node_netns], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"envoy-bootstrap.json" in command and process_alive(int(pid)):
            found.append(int(pid))
    return found


def test_envoy_killed_fails_closed_and_recovers_within_2s(xds_mode_lab: Lab) -> None:
    lab = xds_mode_lab
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


def test_agent_killed_datapath_and_envoy_keep_enforcing_and_are_adopted(xds_mode_lab: Lab) -> None:
    lab = xds_mode_lab
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
    changed = (BILLING / "policies-with-5432" / "billing-api.yaml").read_text().replace("method: GET", "method: HEAD")
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
        lab.up(SHOP / "pods.yaml", tmp_path / "good", ("--envoy-runtime", "re2.max_program_size.error_level=20"))
        assert status_code_shop(lab, "GET", 8080, "/a") == "200"
        with pytest.raises(Exception, match="rejected"):
            lab.apply(tmp_path / "bad", timeout_s=5)
        status = agent_status(lab.agent_socket)
        message = status["xds"]["route"]["message"]
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
        assert "sidecarless_policy_to_enforced_seconds_count 1.0" in metrics  # lab up's change, enforced
        code, readyz = agent_get(lab.agent_socket, "/readyz")
        assert code == 503 and "pending: xds RouteConfiguration: rejected:" in readyz
        assert "program size" in (lab.dir / "agent.log").read_text()
        # A new Envoy, planned (a handover) or not (a crash), starts from the last good configuration, not
        # from the rejected one (which would leave it holding nothing: the pod's L7 ports closed).
        restart = [sys.executable, "-m", "sidecarless", "envoy", "restart", "--lab", lab.name]
        assert subprocess.run(restart, capture_output=True, text=True, timeout=120).returncode == 0
        assert status_code_shop(lab, "GET", 8080, "/a") == "200"
        crashed = agent_status(lab.agent_socket)["envoy"]["pid"]
        os.kill(crashed, signal.SIGKILL)
        wait_until(lambda: agent_status(lab.agent_socket)["envoy"]["pid"] not in (None, crashed), "the next Envoy")
        wait_until(lambda: status_code_shop(lab, "GET", 8080, "/a") == "200", "8080 served again", timeout_s=10)
        assert status_code_shop(lab, "GET", 8080, "/b") == "403"
        assert status_code_shop(lab, "GET", 9000, "/reports/daily/1") == "dropped"
        # Fixed: applied.
        lab.apply(tmp_path / "good")
        assert agent_status(lab.agent_socket)["xds"]["route"]["message"] is None
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
        assert subprocess.run(lab.exec_command("prometheus", command), capture_output=True).returncode != 0, port
    # In the node namespace only Envoy's proxy listeners listen on TCP; admin and xDS are Unix sockets.
    listening = subprocess.run(
        ["ip", "netns", "exec", lab.node_netns, "ss", "-Hltn"], capture_output=True, text=True
    ).stdout.split("\n")
    ports = sorted({line.split()[3].rsplit(":", 1)[1] for line in listening if line.strip()})
    assert ports == ["15001"], listening
    for name in ("xds.sock", "agent.sock"):
        assert oct((lab.agent_dir / name).stat().st_mode & 0o777) == "0o660", name


def test_sigterm_leaves_the_datapath_and_envoy_enforcing_and_exits_0(billing_5432_lab: Lab) -> None:
    lab = billing_5432_lab
    supervisor = lab.supervisor_pid()
    agent, envoy = lab.agent_pid(), lab.status()["envoy"]["pid"]
    assert agent is not None
    os.kill(supervisor, signal.SIGSTOP)  # hold the lab's kubelet so the agent stays away
    try:
        os.kill(agent, signal.SIGTERM)
        wait_until(lambda: not process_alive(agent), "the agent to exit")
        assert not lab.agent_socket.exists() or agent_unreachable(lab)  # it stopped accepting work
        assert process_alive(envoy)
        assert status_code(lab, "prometheus", "GET", "/metrics") == "200"
        assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
        assert status_code(lab, "dev-tool", "GET", "/metrics") == "dropped"
        assert tcp_echo(lab, "finance-batch", 5432)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    wait_until(lambda: lab.status()["agent"]["last_exit"] == 0, "the supervisor to record the exit")
    wait_until(lambda: lab.status()["agent"]["ready"], "the agent to be back")


def agent_unreachable(lab: Lab) -> bool:
    try:
        agent_status(lab.agent_socket)
    except Exception:
        return True
    return False


@pytest.fixture
def billing_5432_sockmap_lab() -> Iterator[Lab]:
    with billing("uninstall", "policies-with-5432", sockmap=True) as lab:
        yield lab


def sock_ops_programs(cgroup: Path) -> list[int]:
    directory = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return attached_program_ids(directory, BPF_CGROUP_SOCK_OPS)
    finally:
        os.close(directory)


def test_datapath_uninstall_removes_everything(billing_5432_sockmap_lab: Lab) -> None:
    lab = billing_5432_sockmap_lab
    envoy = lab.status()["envoy"]["pid"]
    cgroup = lab.cgroup_of("")
    assert cgroup is not None and len(sock_ops_programs(cgroup)) == 1  # socket acceleration, on the pods' cgroup
    assert tcp_echo(lab, "finance-batch", 5432)
    assert agent_status(lab.agent_socket)["datapath"]["counters"]["sockets_paired"] > 0
    for family in ("-4", "-6"):  # what the agent installed: the proxy's routing, both families
        rules = subprocess.run(["ip", family, "-n", lab.node_netns, "rule"], capture_output=True, text=True).stdout
        assert "lookup 2004" in rules, (family, rules)
    os.kill(lab.supervisor_pid(), signal.SIGTERM)  # the agent stops with it
    wait_until(lambda: lab.agent_pid() is None, "the agent to stop")
    command = [
        "nsenter", f"--net=/run/netns/{lab.node_netns}", "--", sys.executable, "-m", "sidecarless",
        "datapath", "uninstall", "--run-dir", str(lab.agent_dir), "--pin-dir", lab.pin_dir,
        "--sockmap-cgroup", str(cgroup),
    ]  # fmt: skip
    # A wrong cgroup is said in one line, before anything is removed.
    wrong = subprocess.run([*command[:-1], f"{cgroup}-missing"], capture_output=True, text=True)
    assert wrong.returncode == 1 and f"cgroup {cgroup}-missing: No such file or directory" in wrong.stderr, wrong
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert Path(lab.pin_dir).exists() and len(sock_ops_programs(cgroup)) == 1 and process_alive(envoy)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "stopped Envoy" in result.stdout
    # The cgroup held the sock_ops program, and through it the maps, until it was taken off.
    assert f"detached socket acceleration from {cgroup}" in result.stdout, result.stdout
    assert sock_ops_programs(cgroup) == []
    wait_until(lambda: not process_alive(envoy), "Envoy to stop")
    assert not Path(lab.pin_dir).exists()
    for pod in lab.pods():
        filters = subprocess.run(["tc", "-n", lab.node_netns, "filter", "show", "dev", pod.interface, "ingress"],
                                 capture_output=True, text=True).stdout  # fmt: skip
        assert "from_pod" not in filters
    tables = subprocess.run(
        ["ip", "netns", "exec", lab.node_netns, "nft", "list", "tables"], capture_output=True, text=True
    )
    assert "sidecarless" not in tables.stdout
    for family in ("-4", "-6"):
        rules = subprocess.run(["ip", family, "-n", lab.node_netns, "rule"], capture_output=True, text=True).stdout
        assert "2004" not in rules, family
        local = subprocess.run(["ip", family, "-n", lab.node_netns, "route", "show", "table", "2004"],
                               capture_output=True, text=True).stdout  # fmt: skip
        assert local.strip() == "", family
    # Without the datapath, nothing is enforced any more: the node forwards plainly.
    assert status_code(lab, "dev-tool", "GET", "/metrics") == "200"


BAD_INPUTS = {
    # name: (how the file is broken, what the error must say after file:line)
    "malformed-yaml": (lambda good: good.replace("  ingress:\n", "  ingress:\n  - [\n"), ": invalid YAML"),
    "unknown-field": (
        lambda good: good.replace('toPorts:\n    - ports: [{port: "8080"', 'toPortz:\n    - ports: [{port: "8080"', 1),
        ": spec.ingress[0].toPortz: unknown field",
    ),
    "wrong-type": (
        lambda good: good.replace(
            'port: "8080", protocol: TCP}]\n      rules: {http: [{method: GET',
            "port: [8080], protocol: TCP}]\n      rules: {http: [{method: GET",
        ),
        ": spec.ingress[0].toPorts[0].ports[0].port: must be a port number",
    ),
    "invalid-regex": (
        lambda good: good.replace("path: /metrics", "path: '/metrics('"),
        ": spec.ingress[0].toPorts[0].rules.http[0].path: invalid regular expression",
    ),
}


def test_bad_policy_input_is_rejected_and_the_policy_in_force_kept(billing_5432_lab: Lab, tmp_path: Path) -> None:
    lab = billing_5432_lab
    good = (BILLING / "policies-with-5432" / "billing-api.yaml").read_text()
    fixed = good.replace("method: GET", "method: HEAD")

    def in_force_unchanged() -> None:
        assert status_code(lab, "prometheus", "GET", "/metrics") == "200"
        assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
        assert status_code(lab, "dev-tool", "GET", "/metrics") == "dropped"

    for name, (breaks, message) in BAD_INPUTS.items():
        directory = tmp_path / name
        write_policy(directory, "billing-api.yaml", breaks(good))
        errors = lab.apply(directory)
        assert len(errors) == 1 and errors[0].startswith(f"{directory}/billing-api.yaml:") and message in errors[0], (
            name,
            errors,
        )
        rejected = agent_status(lab.agent_socket)["policies"]["rejected"]
        assert any(file.endswith("billing-api.yaml") for file in rejected), name
        in_force_unchanged()
    # Not UTF-8, and a 10 MB file beside the good one.
    directory = tmp_path / "bytes"
    write_policy(directory, "billing-api.yaml", good)
    (directory / "latin1.yaml").write_bytes(good.encode().replace(b"billing-api-l7-policy", b"caf\xe9", 1))
    (directory / "huge.yaml").write_bytes(b"# padding\n" * 1024 * 1024)
    errors = lab.apply(directory)
    assert sorted(e.split(": ", 1)[1] for e in errors) == [
        "file is 10485760 bytes, more than 1048576",
        "file is not UTF-8",
    ], errors
    in_force_unchanged()
    # A truncated write, straight into the directory the agent reads (no atomic rename), then the rest.
    target = lab.policies_dir / "billing-api.yaml"
    target.write_text(fixed[: len(fixed) // 2])
    wait_until(
        lambda: str(target) in agent_status(lab.agent_socket)["policies"]["rejected"],
        "the agent to reject the truncated file",
    )
    in_force_unchanged()
    target.write_text(fixed)
    wait_until(lambda: not agent_status(lab.agent_socket)["policies"]["rejected"].get(str(target)), "the fixed file")
    wait_until(lambda: status_code(lab, "prometheus", "GET", "/metrics") == "403", "the fixed policy in force")


CHURN_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: api, namespace: shop}}
spec:
  endpointSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "8080", protocol: TCP}}]
      rules: {{http: [{{method: GET, path: /always}}, {{method: GET, path: "{variable}"}}]}}
"""

CHURN_CLIENT = """
import http.client, json, os, sys
stop_file = sys.argv[1]
connection = None
counts = {}
while not os.path.exists(stop_file):
    for path in ("/always", "/never", "/a", "/b"):
        try:
            if connection is None:
                connection = http.client.HTTPConnection("api", 8080, timeout=2)
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            result = response.status
        except (OSError, http.client.HTTPException) as error:
            result, connection = type(error).__name__, None
        counts[f"{path} {result}"] = counts.get(f"{path} {result}", 0) + 1
print(json.dumps(counts))
"""


def test_policy_churn_under_load_every_answer_is_the_old_or_the_new_policy(tmp_path: Path) -> None:
    lab = Lab(lab_name("churn"))
    variants = {
        name: write_policy(tmp_path / name, "api.yaml", CHURN_POLICY.format(variable=f"/{name}")).parent
        for name in ("a", "b")
    }
    stop_file = tmp_path / "stop"
    try:
        lab.up(SHOP / "pods.yaml", variants["a"])
        client = in_pod(lab, "client", CHURN_CLIENT, str(stop_file))
        for change in range(200):
            lab.apply(variants["b" if change % 2 == 0 else "a"])
        stop_file.write_text("stop")
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
    finally:
        lab.down()
    counts = json.loads(out)
    # Allowed by both policies: always 200 (no 5xx from a missing route or cluster, no reset).
    assert set(k for k in counts if k.startswith("/always")) == {"/always 200"}, counts
    # Denied by both: never let through, not even for a moment.
    assert set(k for k in counts if k.startswith("/never")) == {"/never 403"}, counts
    # Allowed by one of them: 200 or 403, nothing else; and both were seen, so the churn was live.
    for path in ("/a", "/b"):
        assert set(k for k in counts if k.startswith(path + " ")) == {f"{path} 200", f"{path} 403"}, counts
    assert counts["/always 200"] > 400
