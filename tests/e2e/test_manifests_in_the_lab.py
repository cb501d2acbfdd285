"""The DaemonSet's security context, proven in the lab: the agent and Envoy run as its two containers would,
each with exactly the capabilities manifests/daemonset/daemonset.yaml gives it (read from the file), Envoy in a
process of its own (`sidecarless envoy run`), and the billing-api table holds. Dropping any capability the
manifest says the agent needs breaks it, so the list is not longer than it must be (and the test can fail)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from sidecarless.lab.node import Lab, PrepareAgent, with_only_capabilities
from sidecarless.lab.scenario import run_scenario
from sidecarless.lab.topology import LabError, LabNode, LabPod
from sidecarless.policy.yamlnodes import parse_documents, plain
from tests.conftest import REPO
from tests.e2e.conftest import BILLING, lab_name

DAEMONSET = REPO / "manifests" / "daemonset" / "daemonset.yaml"
# Needed on older kernels only (RLIMIT_MEMLOCK before 5.11), as the manifest says.
NOT_NEEDED_ON_THIS_KERNEL = {"SYS_RESOURCE"}


def container(name: str) -> dict[str, Any]:
    daemonset = plain(parse_documents(DAEMONSET.read_text())[0])
    containers: list[dict[str, Any]] = daemonset["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def capabilities(name: str) -> tuple[str, ...]:
    security = container(name)["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"] and security["privileged"] is False
    return tuple(security["capabilities"]["add"])


def envoy_container(capabilities: tuple[str, ...]) -> PrepareAgent:
    """Starts `sidecarless envoy run` in the node, with only `capabilities`, as the envoy container does."""

    def prepare(lab: Lab, node: LabNode, pods: list[LabPod]) -> tuple[str, ...]:
        command = container("envoy")["command"]
        assert command[:3] == ["sidecarless", "envoy", "run"]
        with open(lab.dir / "envoy-container.log", "ab") as log:
            subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{node.netns}", "--", *with_only_capabilities(capabilities),
                 sys.executable, "-m", "sidecarless", "envoy", "run", "--run-dir", str(node.agent_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        # `lab down` stops it with everything else that runs in the lab's namespaces.
        return ("--envoy", "external")

    return prepare


def test_agent_and_envoy_with_the_daemonsets_capabilities_hold_the_billing_table() -> None:
    assert "--envoy=external" in container("agent")["args"]
    lines: list[str] = []
    outcomes = run_scenario(
        BILLING, lab_name("caps"), lines.append,
        prepare_agent=envoy_container(capabilities("envoy")), agent_capabilities=capabilities("agent"),
    )  # fmt: skip
    assert len(outcomes) == 44  # the table's 22 cases, over IPv4 and over IPv6
    assert all(outcome.passed for outcome in outcomes), "\n".join(lines)


@pytest.mark.parametrize("dropped", sorted(set(capabilities("agent")) - NOT_NEEDED_ON_THIS_KERNEL))
def test_the_agent_fails_without_each_capability(dropped: str) -> None:
    fewer = tuple(c for c in capabilities("agent") if c != dropped)
    lab = Lab(lab_name(f"no-{dropped.lower().replace('_', '')}"))
    try:
        with pytest.raises(LabError, match="agent exited"):
            lab.up(BILLING / "pods.yaml", BILLING / "policies", agent_capabilities=fewer)
    finally:
        lab.down()
