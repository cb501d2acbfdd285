"""The DaemonSet's image, built here by `make image` (mmdebstrap's Debian base, the Dockerfile built by podman),
run in the lab as the two DaemonSets run it (issue 18): the agent's container and Envoy's, each with the
manifest's command, arguments and capabilities, in a lab node's network namespace, with the manifest's mounts
made the lab's and nothing else from the node (no kernel headers: the image carries its own). The billing-api
table passes through them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sidecarless.lab import image
from sidecarless.lab.node import Lab, PrepareAgent
from sidecarless.lab.scenario import run_scenario
from sidecarless.lab.topology import LabNode, LabPod
from tests.e2e.conftest import BILLING, lab_name
from tests.e2e.test_manifests_in_the_lab import capabilities, container

IMAGE = os.environ.get("SIDECARLESS_IMAGE", "")


@pytest.fixture(scope="module", autouse=True)
def _image_built() -> None:
    if not IMAGE:
        pytest.fail("SIDECARLESS_IMAGE names no image: run `make test-image`, which builds it first")
    subprocess.run(["podman", "image", "exists", IMAGE], check=True)


def podman_output(*arguments: str) -> str:
    return subprocess.run(["podman", *arguments], capture_output=True, text=True, timeout=120, check=True).stdout


def unconfined(name: str) -> bool:
    """The container's seccompProfile, as the manifest names it: Unconfined, or the runtime's default."""
    profile = container(name)["securityContext"]["seccompProfile"]["type"]
    assert profile in ("Unconfined", "RuntimeDefault"), profile
    return bool(profile == "Unconfined")


def agent_arguments() -> tuple[str, ...]:
    """The manifest's agent arguments, its Kubernetes source made the lab's files (the lab has no API server
    here; tests/e2e/test_kubernetes.py plays that source), and the run and pin directories the lab gives."""
    arguments = container("agent")["args"]
    assert "--source=kubernetes" in arguments and "--envoy=external" in arguments
    lab_given = ("--source=", "--run-dir=", "--pin-dir=")
    return tuple(argument for argument in arguments if not argument.startswith(lab_given))


def envoy_container(processes: list[subprocess.Popen[bytes]]) -> PrepareAgent:
    """Each node's first pod of Envoy's DaemonSet: the manifest's command in the image, its capabilities."""

    def prepare(lab: Lab, node: LabNode, pods: list[LabPod]) -> tuple[str, ...]:
        tmp = lab.dir / f"envoy-pod-{node.name}"
        tmp.mkdir(parents=True, exist_ok=True)
        name = f"scl-{lab.name}-{node.name}-envoy"
        command = image.envoy_command(
            IMAGE,
            name,
            node.netns,
            capabilities("envoy"),
            node.agent_dir,
            tmp,
            container("envoy")["command"],
            unconfined("envoy"),
        )
        with open(lab.dir / f"{name}.log", "ab") as log:
            processes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        return ()

    return prepare


def test_the_images_two_containers_hold_the_billing_table() -> None:
    # The manifest mounts exactly what the lab gives the container: bpffs, the node's net sysctls and the run
    # directory; no /lib/modules, no /usr/src.
    assert {mount["mountPath"] for mount in container("agent")["volumeMounts"]} == set(image.AGENT_MOUNTS)
    assert {mount["mountPath"] for mount in container("envoy")["volumeMounts"]} == {image.RUN_DIR, "/tmp"}
    processes: list[subprocess.Popen[bytes]] = []
    running: list[str] = []
    lines: list[str] = []

    def apply(lab: Lab, policies: Path) -> list[str]:
        """Between the table's stages: which containers serve it."""
        running.extend(podman_output("ps", "--format", "{{.Names}} {{.Image}}").splitlines())
        return lab.apply(policies)

    name = lab_name("image")
    try:
        outcomes = run_scenario(
            BILLING, name, lines.append, agent_options=agent_arguments(), prepare_agent=envoy_container(processes),
            apply=apply, agent_capabilities=capabilities("agent"), agent_image=image.Image(IMAGE, unconfined("agent")),
        )  # fmt: skip
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    assert len(outcomes) == 44, "\n".join(lines)  # the table's 22 cases, over IPv4 and over IPv6
    assert all(outcome.passed for outcome in outcomes), "\n".join(lines)
    node = Lab(name).node().name
    assert {f"scl-{name}-{node}-agent {IMAGE}", f"scl-{name}-{node}-envoy {IMAGE}"} <= set(running), running


def test_the_image_carries_kernel_headers_and_neither_the_labs_server_nor_the_charts() -> None:
    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            image.podman_run(IMAGE, f"scl-{os.getpid()}-image-probe", None, (), (), command),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    headers = run(
        "sh", "-c", 'test -f "$BCC_KERNEL_SOURCE/include/linux/kconfig.h" && cat "$BCC_KERNEL_SOURCE/VERSION"'
    )
    assert headers.returncode == 0 and headers.stdout.startswith("linux-headers-"), headers
    for module in ("hypercorn", "matplotlib"):
        absent = run("python", "-c", f"import {module}")
        assert absent.returncode == 1 and "ModuleNotFoundError" in absent.stderr, (module, absent)
    assert run("sidecarless", "--version").stdout.startswith("sidecarless ")
