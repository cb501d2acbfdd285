"""Envoy's workers: the CPUs it may use (issue 19): its cgroup's CPU quota, v2 or v1, within its cpuset."""

from pathlib import Path

import pytest

from sidecarless.envoy.workers import cgroup_quota, concurrency, cpu_limit


@pytest.mark.parametrize(
    ("affinity", "quota", "period", "workers"),
    [
        (8, None, None, 8),  # no quota: every CPU it may be scheduled on
        (8, 200000, 100000, 2),  # limits.cpu: 2
        (8, 150000, 100000, 2),  # 1.5 CPUs: two workers, each busy part of the time
        (8, 50000, 100000, 1),  # 500m: one
        (2, 400000, 100000, 2),  # a quota above the cpuset: the cpuset
        (1, None, None, 1),
    ],
)
def test_workers_are_the_cpus_it_may_use(affinity: int, quota: int | None, period: int | None, workers: int) -> None:
    assert cpu_limit(affinity, quota, period) == workers


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_quota_is_read_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    write(tmp_path / "kubepods/pod1/envoy/cpu.max", "200000 100000\n")
    assert cgroup_quota("0::/kubepods/pod1/envoy\n", tmp_path) == (200000, 100000)
    write(tmp_path / "cpu.max", "max 100000\n")  # a container that sees its cgroup as the root
    assert cgroup_quota("0::/elsewhere\n", tmp_path) == (None, 100000)
    v1 = tmp_path / "v1"
    write(v1 / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "150000\n")
    write(v1 / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    lines = "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert cgroup_quota(lines, v1) == (150000, 100000)
    write(v1 / "cpu/cpu.cfs_quota_us", "-1\n")
    write(v1 / "cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_quota("4:cpu,cpuacct:/\n", v1) == (None, 100000)
    assert cgroup_quota("", tmp_path / "none") == (None, None)


def test_the_flag_takes_a_number_or_auto() -> None:
    assert concurrency("3") == 3 and concurrency("auto") >= 1
    for wrong in ("0", "-1", "many"):
        with pytest.raises(ValueError):
            concurrency(wrong)
