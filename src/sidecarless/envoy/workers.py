"""How many worker threads the node's Envoy runs: as many as the CPUs its container may use (Envoy's own advice
for --concurrency), read where Kubernetes and the kernel say it: the CPU quota of its cgroup (a pod's
`resources.limits.cpu`; cgroup v2's cpu.max or v1's cpu.cfs_quota_us) and the CPUs it may be scheduled on
(cpuset). Workers beyond that only contend for the same CPU time."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_limit(affinity: int, quota_us: int | None, period_us: int | None) -> int:
    """The CPUs a process may use: its affinity, lowered to its quota rounded up (a quota of 1.5 CPUs gets two
    workers, each busy part of the time); at least one."""
    if quota_us is not None and period_us and quota_us > 0:
        return max(1, min(affinity, math.ceil(quota_us / period_us)))
    return max(1, affinity)


def cgroup_quota(cgroup_file: str, root: Path = CGROUP_ROOT) -> tuple[int | None, int | None]:
    """(quota, period) in microseconds of the cgroup `/proc/self/cgroup` names, v2 or v1; (None, None): no
    quota, or none readable."""
    for line in cgroup_file.splitlines():
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # v2: "0::/path"
            text = _value(root, relative, "cpu.max")
            if text:
                v2_quota, _, period = text.partition(" ")
                return (None if v2_quota == "max" else int(v2_quota)), int(period or 100000)
        elif "cpu" in controllers.split(","):
            for directory in (root / "cpu", root / "cpu,cpuacct", root / controllers):
                quota_text = _value(directory, relative, "cpu.cfs_quota_us")
                period_text = _value(directory, relative, "cpu.cfs_period_us")
                if quota_text and period_text:
                    v1_quota = int(quota_text)
                    return (None if v1_quota < 0 else v1_quota), int(period_text)
    return None, None


def _value(hierarchy: Path, cgroup: str, name: str) -> str | None:
    """A cgroup's file; a container that sees its own cgroup as the hierarchy's root finds it there."""
    return _read(hierarchy / cgroup / name) or _read(hierarchy / name)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def available_cpus() -> int:
    """The workers for this process's Envoy (`--envoy-concurrency auto`)."""
    try:
        cgroup_file = Path("/proc/self/cgroup").read_text()
    except OSError:
        cgroup_file = ""
    return cpu_limit(len(os.sched_getaffinity(0)), *cgroup_quota(cgroup_file))


def concurrency(text: str) -> int:
    """A --concurrency flag: `auto` (available_cpus) or a positive number."""
    if text == "auto":
        return available_cpus()
    value = int(text)
    if value <= 0:
        raise ValueError(f"{text}: a positive number or auto")
    return value
