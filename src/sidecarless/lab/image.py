"""The DaemonSet's image in the lab (`make test-image`): its agent and Envoy containers, run by podman in a lab
node's network namespace with the manifests' capabilities, and with the DaemonSet's mounts made the lab's. The
only module that runs podman.

The containers see what a node's would: bpffs, the node's net sysctls (at /host/proc/sys/net: /proc/sys/net is
per network namespace, so the bind shows the node's to a process in it), the run directory the two share, and
(read-only) the lab's policy files and pod list, which the files source reads. No kernel headers: the image
carries its own (Dockerfile)."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RUN_DIR = "/run/sidecarless"  # where both containers mount the node's run directory (the manifests' path)
LAB_DIR = "/lab"  # the lab's directory (its policies/ and endpoints.json), read-only
PROC_SYS_NET = "/host/proc/sys/net"
BPFFS = "/sys/fs/bpf"
# The DaemonSets' mount paths, each with what stands for it in the lab (None: the lab's own directory).
AGENT_MOUNTS = {BPFFS: BPFFS, PROC_SYS_NET: "/proc/sys/net", RUN_DIR: None}


@dataclass(frozen=True)
class Image:
    name: str  # e.g. localhost/sidecarless:0.1.0
    # The agent container's seccompProfile: Unconfined, or the runtime's default profile.
    agent_seccomp_unconfined: bool


def podman_run(
    image: str,
    container: str,
    netns: str | None,
    capabilities: Sequence[str],
    volumes: Sequence[tuple[str, str, bool]],
    command: Sequence[str],
    seccomp_unconfined: bool = False,
) -> list[str]:
    """`podman run` in the foreground (the lab's supervisor, or a test, holds its pid; SIGTERM reaches the
    container). `netns`: a lab node's network namespace (None: no network). `volumes`: (host path, container
    path, read-only).

    On the machines the suite runs on (themselves containers: no CAP_SYS_RESOURCE, cgroups v1 beside v2) podman
    needs runc (crun refuses hybrid cgroups) and limits no higher than the machine's own; scripts/podman-flags.sh
    says the same for the build."""
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return [
        "podman", "--runtime", "runc", "run", "--rm", "--replace", "--name", container,
        f"--network=ns:/run/netns/{netns}" if netns is not None else "--network=none",
        "--ulimit", f"nofile={open_files}:{open_files}", "--ulimit", "nproc=16384:16384",
        "--cap-drop=all", *(f"--cap-add={capability}" for capability in capabilities),
        "--security-opt=no-new-privileges", *(["--security-opt=seccomp=unconfined"] if seccomp_unconfined else []),
        *(f"--volume={host}:{inside}{':ro' if read_only else ''}" for host, inside, read_only in volumes),
        image, *command,
    ]  # fmt: skip


def agent_command(
    image: Image,
    lab: str,
    node: str,
    netns: str,
    capabilities: Sequence[str],
    lab_dir: Path,
    node_run_dir: Path,
    arguments: Sequence[str],
) -> list[str]:
    """The agent's container on a lab node; `arguments` follow `sidecarless agent` (the lab's files under
    LAB_DIR)."""
    volumes = [(host or str(node_run_dir), inside, False) for inside, host in AGENT_MOUNTS.items()]
    volumes.append((str(lab_dir), LAB_DIR, True))
    return podman_run(
        image.name, f"scl-{lab}-{node}-agent", netns, capabilities, volumes, ["sidecarless", "agent", *arguments],
        image.agent_seccomp_unconfined,
    )  # fmt: skip


def envoy_command(
    image: str,
    container: str,
    netns: str,
    capabilities: Sequence[str],
    node_run_dir: Path,
    tmp_dir: Path,
    command: Sequence[str],
    seccomp_unconfined: bool,
) -> list[str]:
    """A pod of Envoy's DaemonSet on a lab node: the manifest's command, the run directory and its /tmp (where
    its readiness file goes) mounted."""
    volumes = [(str(node_run_dir), RUN_DIR, False), (str(tmp_dir), "/tmp", False)]
    return podman_run(image, container, netns, capabilities, volumes, command, seccomp_unconfined)
