"""The DaemonSet's security context, proven in the lab: the agent and Envoy run as its two containers would,
each with exactly the capabilities manifests/daemonset/daemonset.yaml gives it (read from the file), Envoy in a
process of its own (`sidecarless envoy run`), and the billing-api table holds. Dropping any capability the
manifest says the agent needs breaks it, so the list is not longer than it must be (and the test can fail)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecarless.lab.node import Lab, PrepareAgent, with_only_capabilities
from sidecarless.lab.scenario import run_scenario
from sidecarless.lab.topology import BPF_PIN_ROOT, LabError, LabNode, LabPod
from sidecarless.policy.yamlnodes import parse_documents, plain
from sidecarless.redirect.bpf_syscall import map_id, object_get, program_map_ids
from tests.conftest import REPO
from tests.e2e.conftest import BILLING, lab_name, wait_until
from tests.e2e.test_zero_drop import RATE, SteadyLoad, envoy_requests

DAEMONSETS = (REPO / "manifests" / "daemonset" / "daemonset.yaml", REPO / "manifests" / "daemonset" / "envoy.yaml")
# Needed on older kernels only (RLIMIT_MEMLOCK before 5.11), as the manifest says.
NOT_NEEDED_ON_THIS_KERNEL = {"SYS_RESOURCE"}


def container(name: str) -> dict[str, Any]:
    """A container of the agent's DaemonSet or Envoy's."""
    for path in DAEMONSETS:
        daemonset = plain(parse_documents(path.read_text())[0])
        containers: list[dict[str, Any]] = daemonset["spec"]["template"]["spec"]["containers"]
        for found in containers:
            if found["name"] == name:
                return found
    raise AssertionError(f"no container {name} in {DAEMONSETS}")


def capabilities(name: str) -> tuple[str, ...]:
    security = container(name)["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"] and security["privileged"] is False
    return tuple(security["capabilities"]["add"])


def start_envoy_pod(lab: Lab, node: LabNode, pod_name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """One pod of Envoy's DaemonSet on a lab node: the manifest's command (its run directory and readiness file
    made the lab's) with only the manifest's capabilities, in the node's network. Returns the process and its
    readiness file. `lab down` stops it with everything else that runs in the lab's namespaces."""
    command = container("envoy")["command"]
    assert command[:3] == ["sidecarless", "envoy", "run"]
    ready_file = lab.dir / f"{pod_name}.ready"
    arguments = [
        f"--run-dir={node.agent_dir}" if item.startswith("--run-dir=")
        else f"--ready-file={ready_file}" if item.startswith("--ready-file=")
        else item
        for item in command[3:]
    ]  # fmt: skip
    with open(lab.dir / f"{pod_name}.log", "ab") as log:
        process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{node.netns}", "--", *with_only_capabilities(capabilities("envoy")),
             sys.executable, "-m", "sidecarless", "envoy", "run", *arguments],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    return process, ready_file


def envoy_daemonset(pods: list[subprocess.Popen[bytes]] | None = None) -> PrepareAgent:
    """The agent as the agent's DaemonSet runs it (`--envoy external`), and the first pod of Envoy's."""

    def prepare(lab: Lab, node: LabNode, lab_pods: list[LabPod]) -> tuple[str, ...]:
        process, _ = start_envoy_pod(lab, node, "envoy-pod-1")
        if pods is not None:
            pods.append(process)
        return ("--envoy", "external")

    return prepare


def test_agent_and_envoy_with_the_daemonsets_capabilities_hold_the_billing_table() -> None:
    assert "--envoy=external" in container("agent")["args"]
    assert "envoy" not in [
        c["name"]
        for c in plain(parse_documents(DAEMONSETS[0].read_text())[0])["spec"]["template"]["spec"]["containers"]
    ]
    lines: list[str] = []
    outcomes = run_scenario(
        BILLING, lab_name("caps"), lines.append,
        prepare_agent=envoy_daemonset(), agent_capabilities=capabilities("agent"),
    )  # fmt: skip
    assert len(outcomes) == 44  # the table's 22 cases, over IPv4 and over IPv6
    assert all(outcome.passed for outcome in outcomes), "\n".join(lines)


# The agent's start: the datapath loaded (compiled by the child when this build is not pinned yet).
LOAD_DATAPATH = "import sys; from sidecarless.redirect.bpf import BpfDatapath; print(BpfDatapath(sys.argv[1]).compiled)"


def test_a_new_build_of_the_programs_loads_against_the_maps_in_place_with_the_daemonsets_capabilities() -> None:
    """An upgrade keeps the maps (conntrack, policy) and brings new programs. BCC opens a pinned map by id, which
    takes CAP_SYS_ADMIN, and so failed here: the child loads the programs against the pins opened by path."""
    pin_dir = f"{BPF_PIN_ROOT}/test-upgrade-{os.getpid()}"
    command = [*with_only_capabilities(capabilities("agent")), sys.executable, "-c", LOAD_DATAPATH, pin_dir]
    try:
        first = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert first.stdout.split() == ["True"], first.stderr[-3000:]
        (maps,) = Path(pin_dir).glob("maps-*")
        config_id = map_id(object_get(str(maps / "scl_config")))
        for build in maps.glob("programs-*"):  # as a new source would: no programs for it yet
            shutil.rmtree(build)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.stdout.split() == ["True"], second.stderr[-3000:]
        (build,) = maps.glob("programs-*")
        for program in ("from_pod", "to_pod", "scl_sock_ops", "scl_sk_msg"):
            assert config_id in program_map_ids(object_get(str(build / program))), program
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.mark.parametrize("dropped", sorted(set(capabilities("agent")) - NOT_NEEDED_ON_THIS_KERNEL))
def test_the_agent_fails_without_each_capability(dropped: str) -> None:
    fewer = tuple(c for c in capabilities("agent") if c != dropped)
    lab = Lab(lab_name(f"no-{dropped.lower().replace('_', '')}"))
    try:
        with pytest.raises(LabError, match="agent exited"):
            lab.up(BILLING / "pods.yaml", BILLING / "policies", agent_capabilities=fewer)
    finally:
        lab.down()


def test_a_rollout_of_the_envoy_daemonset_under_load_fails_no_request() -> None:
    """Played as Kubernetes does it with maxSurge 1, maxUnavailable 0: the new pod's Envoy starts beside the
    old one, its readiness file appears once it is ready, then the old pod gets SIGTERM and drains before it
    exits. The agent is not restarted; the load (keep-alive and new connections) goes on throughout."""
    pods: list[subprocess.Popen[bytes]] = []
    lab = Lab(lab_name("rollout"))
    try:
        lab.up(BILLING / "pods.yaml", BILLING / "policies", prepare_agent=envoy_daemonset(pods))
        node = lab.node()
        agent = lab.agent_pid()
        load = SteadyLoad(lab, "prometheus", "billing-api:8080", "GET:/metrics=200", "POST:/metrics=403", h2c_rate=50)
        try:
            start = envoy_requests(lab)
            wait_until(lambda: envoy_requests(lab) > start + RATE // 2, "the load to run", timeout_s=15)
            for generation in range(2, 4):
                new_pod, ready_file = start_envoy_pod(lab, node, f"envoy-pod-{generation}")
                wait_until(ready_file.exists, "the new pod to be ready", timeout_s=30)
                old_pod = pods[-1]
                pods.append(new_pod)
                old_pod.send_signal(signal.SIGTERM)  # the kubelet ends the old pod once the new one is ready
                assert old_pod.wait(timeout=30) == 0  # drained, then exited
                before = envoy_requests(lab)  # the admin link now leads to the new pod's Envoy
                wait_until(lambda before=before: envoy_requests(lab) > before + RATE // 5, "requests", timeout_s=10)
        finally:
            summary = load.stop()
        print(f"Envoy DaemonSet rolled out twice under load: {summary}")
        assert lab.agent_pid() == agent  # the agent was not restarted
        assert summary["answered"] > RATE * 5, summary
        assert summary["failed"] == 0 and summary["wrong"] == 0, summary
        assert summary["closed_politely"] >= 2 and summary["h2c_goaways"] >= 2, summary
    finally:
        lab.down()
