"""The files source wakes on inotify events: each kind of change arrives long before the rescan would find it."""

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecarless.sources import files
from sidecarless.sources.files import FileSource
from sidecarless.sources.source import SourceUpdate

DEADLINE_S = 5.0
RESCAN_S = 600.0  # only inotify can deliver within the deadline

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
"""


def _endpoints(ips: list[str]) -> str:
    endpoints = [
        {"name": f"pod-{i}", "namespace": "default", "labels": {"app": "server"}, "ip": ip, "interface": f"lxc{i}"}
        for i, ip in enumerate(ips)
    ]
    return json.dumps({"endpoints": endpoints, "node": {"ips": ["10.0.0.1"]}})


async def _next(updates: AsyncIterator[SourceUpdate]) -> tuple[SourceUpdate, float]:
    started = time.monotonic()
    async with asyncio.timeout(DEADLINE_S):
        update = await anext(updates)
    return update, time.monotonic() - started


def _policy_names(update: SourceUpdate) -> list[str]:
    assert update.policy_set is not None
    return sorted(policy.name for policy in update.policy_set.policies)


def _replace_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.rename(temporary, path)


def _configmap_update(directory: Path, text: str, version: int) -> None:
    """What the kubelet does to a ConfigMap volume: a new timestamped directory, `..data` renamed onto it."""
    data = directory / f"..v{version}"
    data.mkdir()
    (data / "policy.yaml").write_text(text)
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    os.rename(link, directory / "..data")
    if not (directory / "policy.yaml").is_symlink():
        (directory / "policy.yaml").symlink_to("..data/policy.yaml")


Change = tuple[str, Callable[[Path], object], list[str]]
CHANGES: list[Change] = [
    ("written in place", lambda d: (d / "a.yaml").write_text(POLICY.format(name="written")), ["written"]),
    ("replaced atomically", lambda d: _replace_atomically(d / "a.yaml", POLICY.format(name="renamed")), ["renamed"]),
    ("a file added", lambda d: (d / "b.yaml").write_text(POLICY.format(name="added")), ["added", "first"]),
    ("removed", lambda d: (d / "a.yaml").unlink(), []),
]


@pytest.mark.parametrize("change", CHANGES, ids=[c[0] for c in CHANGES])
async def test_a_policy_change_wakes_the_source(tmp_path: Path, change: Change) -> None:
    _, apply, expected = change
    policies, endpoints = tmp_path / "policies", tmp_path / "endpoints.json"
    policies.mkdir()
    (policies / "a.yaml").write_text(POLICY.format(name="first"))
    endpoints.write_text(_endpoints(["10.0.1.1"]))
    updates = FileSource(policies, endpoints, rescan_interval_s=RESCAN_S).updates()
    try:
        first, _ = await _next(updates)
        assert _policy_names(first) == ["first"] and first.node is not None
        apply(policies)
        update, seconds = await _next(updates)
        assert _policy_names(update) == expected and update.node is None
        assert seconds < 1.0
    finally:
        await updates.aclose()


async def test_configmap_volume_updates_and_endpoints_file_wake_the_source(tmp_path: Path) -> None:
    policies, endpoints = tmp_path / "policies", tmp_path / "node" / "endpoints.json"
    policies.mkdir()
    endpoints.parent.mkdir()
    _configmap_update(policies, POLICY.format(name="v1"), 1)
    endpoints.write_text(_endpoints(["10.0.1.1"]))
    updates = FileSource(policies, endpoints, rescan_interval_s=RESCAN_S).updates()
    try:
        first, _ = await _next(updates)
        assert _policy_names(first) == ["v1"]
        _configmap_update(policies, POLICY.format(name="v2"), 2)
        update, _ = await _next(updates)
        assert _policy_names(update) == ["v2"]
        _replace_atomically(endpoints, _endpoints(["10.0.1.1", "10.0.1.2"]))
        update, _ = await _next(updates)
        assert update.policy_set is None and update.node is not None and len(update.node.endpoints) == 2
    finally:
        await updates.aclose()


async def test_a_policy_directory_created_later_is_found_by_the_rescan(tmp_path: Path) -> None:
    policies, endpoints = tmp_path / "policies", tmp_path / "endpoints.json"
    endpoints.write_text(_endpoints(["10.0.1.1"]))
    updates = FileSource(policies, endpoints, rescan_interval_s=0.2).updates()
    try:
        first, _ = await _next(updates)
        assert _policy_names(first) == []
        policies.mkdir()
        (policies / "a.yaml").write_text(POLICY.format(name="late"))
        update, _ = await _next(updates)  # the rescan finds it
        assert _policy_names(update) == ["late"]
    finally:
        await updates.aclose()


def test_a_file_removed_while_the_directory_is_read_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.yaml").write_text(POLICY.format(name="kept"))
    # Listed, then removed before it is read: what an editor's save or `kubectl cp` can do at any moment.
    monkeypatch.setattr(files, "policy_files", lambda directory: [directory / "a.yaml", directory / "gone.yaml"])
    assert list(files.read_policy_files(tmp_path)) == [tmp_path / "a.yaml"]


async def test_a_file_written_in_place_is_read_only_once_its_writer_closes_it(tmp_path: Path) -> None:
    """Truncated and not yet written (an editor or `cp` writing in place): read now, the file would hold no
    policy, and the one in force would be gone until the rest arrived."""
    policies, endpoints = tmp_path / "policies", tmp_path / "endpoints.json"
    policies.mkdir()
    (policies / "a.yaml").write_text(POLICY.format(name="first"))
    endpoints.write_text(_endpoints(["10.0.1.1"]))
    updates = FileSource(policies, endpoints, rescan_interval_s=RESCAN_S).updates()
    try:
        first, _ = await _next(updates)
        assert _policy_names(first) == ["first"]
        with open(policies / "a.yaml", "w") as writer:  # truncated now
            pending = asyncio.ensure_future(anext(updates))
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            assert not done, "the source read a file its writer had not closed"
            writer.write(POLICY.format(name="second"))
        async with asyncio.timeout(DEADLINE_S):
            update = await pending
        assert _policy_names(update) == ["second"]
    finally:
        await updates.aclose()
