"""Root tier: real network namespaces, TC programs, nftables and Envoy, in a lab.

With SIDECARLESS_REQUIRE_E2E=1 (CI) a missing prerequisite fails the run; otherwise these tests skip.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from sidecarless.lab.node import Lab
from sidecarless.lab.scenario import Outcome
from tests.conftest import EXAMPLES

BILLING = EXAMPLES / "billing-api"


def missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("ip", "nft", "nsenter", "curl", "nc"):
        if shutil.which(tool) is None:
            missing.append(tool)
    probe = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True)
    if probe.returncode != 0:
        missing.append("bcc (python3-bpfcc)")
    if not os.path.ismount("/sys/fs/bpf"):
        missing.append("bpffs at /sys/fs/bpf")
    return missing


@pytest.fixture(autouse=True, scope="session")
def _children_take_sigint() -> None:
    """Tests stop a monitor as a user does, with SIGINT. A shell that starts the suite in the background
    without job control ignores SIGINT, and an ignored signal stays ignored across exec: handled here, it is
    back to the default in every process the tests start."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _require_prerequisites() -> None:
    missing = missing_prerequisites()
    if not missing:
        return
    if os.environ.get("SIDECARLESS_REQUIRE_E2E") == "1":
        pytest.fail(f"SIDECARLESS_REQUIRE_E2E=1 and e2e prerequisites are missing: {', '.join(missing)}")
    pytest.skip(f"e2e needs {', '.join(missing)}")


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    """Poll a condition until it holds, failing after `timeout_s`: no sleeps as synchronisation."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lab_name(tag: str) -> str:
    """Unique per test run (the pid), 20 characters at most (lab names are)."""
    name = f"e2e{os.getpid() % 100000}-{tag}"
    assert len(name) <= 20, f"lab name {name!r}: use a shorter tag"
    return name


@contextmanager
def billing(
    tag: str, policies: str = "policies", agent_options: tuple[str, ...] = (), sockmap: bool | None = None
) -> Iterator[Lab]:
    """The billing-api pods with one of its policy directories, removed afterwards (also on failure)."""
    lab = Lab(lab_name(tag))
    try:
        lab.up(BILLING / "pods.yaml", BILLING / policies, agent_options, sockmap=sockmap)
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def billing_lab() -> Iterator[Lab]:
    """The billing-api lab, shared by a module's tests; each test leaves the original policies in force."""
    with billing("billing") as lab:
        yield lab


def http(lab: Lab, pod: str, method: str, url_path: str, port: int = 8080) -> subprocess.CompletedProcess[str]:
    command = ["curl", "-sS", "--path-as-is", "-X", method, "--connect-timeout", "1.5", "--max-time", "5",
               "-w", "\n%{http_code}", f"http://billing-api:{port}{url_path}"]  # fmt: skip
    return subprocess.run(lab.exec_command(pod, command), capture_output=True, text=True, timeout=30)


def status_code(lab: Lab, pod: str, method: str, url_path: str) -> str:
    result = http(lab, pod, method, url_path)
    code = result.stdout.rpartition("\n")[2]
    return "dropped" if result.returncode == 28 else code


def tcp_echo(lab: Lab, pod: str, port: int, family: int | None = None) -> bool:
    """A TCP exchange with billing-api's echo; over `family` (4 or 6), else as its name resolves."""
    payload = "hello\n"
    flags = [f"-{family}"] if family else []
    command = lab.exec_command(pod, ["nc", *flags, "-N", "-w", "2", "billing-api", str(port)])
    result = subprocess.run(command, input=payload, capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and result.stdout == payload


def write_policy(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def assert_ran_in_both_families(outcomes: Sequence[Outcome]) -> None:
    """Every case between two dual-stack ends ran over IPv4 and over IPv6 (the same expectation, so passing both
    means identical verdicts); only cases with a single-family end (an external host) ran once."""
    expanded = {family: {o.case.id.rsplit(" (IPv", 1)[0] for o in outcomes if o.case.id.endswith(f" (IPv{family})")}
                for family in (4, 6)}  # fmt: skip
    assert expanded[6], "no case ran over IPv6"
    assert expanded[4] == expanded[6], expanded


CLI = [sys.executable, "-m", "sidecarless"]


class Monitor:
    """`sidecarless monitor -o json` in the background; each line kept with the time it arrived."""

    def __init__(self, lab: Lab, *arguments: str) -> None:
        command = [*CLI, "monitor", "--lab", lab.name, "-o", "json", *arguments]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.events: list[tuple[float, dict[str, object]]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.append((time.time(), json.loads(line)))

    def wait_live(self, lab: Lab) -> None:
        """Until the stream is open: requests that show up in it (the monitor announces nothing itself)."""
        deadline = time.monotonic() + 10
        while not any(e["type"] == "l7" for _, e in self.events):
            assert time.monotonic() < deadline, "the monitor shows no events"
            status_code(lab, "prometheus", "GET", "/metrics")
            time.sleep(0.05)
        self.events.clear()

    def stop(self) -> list[tuple[float, dict[str, object]]]:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=10)
        self.thread.join(timeout=10)
        return self.events
