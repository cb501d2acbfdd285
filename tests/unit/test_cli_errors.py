"""A user's mistake is one line and exit status 1, never a traceback (issue 18, first row): no agent where one was
named, an unknown lab, a pod file or policy file that does not parse."""

import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "sidecarless"]


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *arguments], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (("status", "-H", "/nonexistent/agent.sock"), "no agent answers on /nonexistent/agent.sock"),
        (("monitor", "-H", "/nonexistent/agent.sock"), "start one (`sidecarless agent"),
        (("policy", "hits", "--lab", "no-such-lab"), "the agent of lab no-such-lab does not answer"),
        (("envoy", "stats", "--lab", "no-such-lab"), "sidecarless lab up --lab no-such-lab"),
    ],
)
def test_no_agent_is_one_line_saying_what_does_not_answer_and_how_to_start_it(
    arguments: tuple[str, ...], says: str
) -> None:
    result = run(*arguments)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert says in result.stderr


def test_a_pod_file_with_an_unknown_field_is_its_message_alone(tmp_path: Path) -> None:
    pods = tmp_path / "pods.yaml"
    pods.write_text("pods:\n  - {name: a, namespace: x, ipFamily: dual}\n")
    policies = tmp_path / "policies"
    policies.mkdir()
    result = run("lab", "up", "--name", "bad-pods", "--pods", str(pods), "--policies", str(policies))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"sidecarless: {pods}:2: pods[0].ipFamily: unknown field")


def test_an_agent_given_credentials_it_cannot_use_says_which_file_and_field(tmp_path: Path) -> None:
    """Issue 19 replaced the generated Kubernetes client: its credentials are read at the agent's start."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    common = ("agent", "--source", "kubernetes", "--node-name", "node-a", "--run-dir", str(tmp_path / "run"))
    result = run(*common, "--k8s-kubeconfig-path", str(kubeconfig))
    assert (result.returncode, result.stderr) == (1, f"sidecarless: {kubeconfig}: current-context: not set\n")
    outside = subprocess.run([*CLI, *common], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert outside.returncode == 1 and outside.stderr.startswith("sidecarless: not in a pod"), outside.stderr
