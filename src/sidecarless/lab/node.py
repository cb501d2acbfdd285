"""A hermetic node in network namespaces, built the way a CNI builds one (DATAPATH.md).

A node namespace and one namespace per pod, joined by veth pairs created inside the node namespace, so the
root namespace is never touched. Everything a lab makes carries its name (`scl-<name>-...`), and `down`
finds it by that name, so it also cleans up after a crash half-way through `up`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sidecarless.api.client import AgentUnreachable, agent_status
from sidecarless.envoy.admin import stat_value
from sidecarless.lab.pods import NODE_IP, NODE_IP6, NODE_LINK_LOCAL6, Pod, parse_pods, place
from sidecarless.lab.supervisor import read_record, supervise
from sidecarless.sources.files import directory_digest, policy_files, validate_policies

LAB_ROOT = Path(os.environ.get("SIDECARLESS_LAB_ROOT", "/run/sidecarless/lab"))
BPF_PIN_ROOT = "/sys/fs/bpf/sidecarless"
NETNS_PREFIX = "scl-"
_LAB_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0


class LabError(Exception):
    """The lab could not do what was asked; the message says why."""


@dataclass(frozen=True)
class LabPod:
    name: str
    namespace: str  # "" for an external host
    labels: dict[str, str]
    ip: str  # IPv4; "" for an IPv6-only pod
    interface: str  # node-side veth
    netns: str
    server_pid: int | None
    service_account: str = "default"
    named_ports: tuple[tuple[str, int, str], ...] = ()  # (name, port, TCP|UDP)
    ip6: str = ""  # IPv6; "" for an IPv4-only pod

    @property
    def external(self) -> bool:
        return not self.namespace

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def families(self) -> set[int]:
        """The address families it has: 4, 6 or both."""
        return {family for family, address in ((4, self.ip), (6, self.ip6)) if address}

    def is_named(self, reference: str) -> bool:
        """`reference` names it: its name, or namespace/name."""
        return reference in (self.name, self.key)


# Runs when a lab's pods exist, before its agent starts; returns more agent arguments.
PrepareAgent = Callable[["Lab", list[LabPod]], tuple[str, ...]]


def with_only_capabilities(capabilities: list[str] | tuple[str, ...]) -> list[str]:
    """A command prefix that runs what follows with only these capabilities, as a container whose
    securityContext drops ALL and adds them. As root, exec gives a process every capability in its bounding
    set: the bounding set is what it may use."""
    return ["setpriv", "--bounding-set", ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)]), "--"]


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, text=True, capture_output=True)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def _wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by us) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _stop_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


class Lab:
    def __init__(self, name: str = "default") -> None:
        if not _LAB_NAME.match(name):
            raise LabError(f"lab name {name!r}: 1-20 characters of a-z, 0-9 and -, starting with a letter or digit")
        self.name = name
        self.dir = LAB_ROOT / name
        self.node_netns = f"{NETNS_PREFIX}{name}-node"
        self.pin_dir = f"{BPF_PIN_ROOT}/lab-{name}"

    @property
    def node_name(self) -> str:
        return f"lab-{self.name}"

    # Paths the agent and the lab share.
    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def policies_dir(self) -> Path:
        return self.dir / "policies"

    @property
    def endpoints_file(self) -> Path:
        return self.dir / "endpoints.json"

    @property
    def agent_dir(self) -> Path:
        return self.dir / "agent"

    @property
    def agent_record(self) -> Path:
        return self.dir / "agent.json"

    @property
    def agent_socket(self) -> Path:
        return self.agent_dir / "agent.sock"

    def pod_netns(self, pod: Pod) -> str:
        if pod.external_ip is not None:
            return f"{NETNS_PREFIX}{self.name}-ext-{pod.name}"
        return f"{NETNS_PREFIX}{self.name}-{pod.namespace}-{pod.name}"

    # up
    def up(
        self,
        pods_file: Path,
        policies_dir: Path,
        agent_options: tuple[str, ...] = (),
        prepare_agent: PrepareAgent | None = None,
        agent_capabilities: tuple[str, ...] | None = None,
        start_agent: bool = True,
    ) -> None:
        """`start_agent` false: pods and node only, no agent, no programs (the benchmark's baseline).
        `agent_options`: extra agent arguments (e.g. --envoy-runtime KEY=VALUE). `prepare_agent` runs once
        the pods exist, before the agent starts, and returns more agent arguments (the fake Kubernetes API
        server starts there). `agent_capabilities`: run the agent (and its Envoy) with only these, as the
        DaemonSet's container does (e.g. ("NET_ADMIN", "BPF")); None: all of root's."""
        if self.state_file.exists() or self.node_netns in self._namespaces():
            raise LabError(f"lab {self.name} exists; `sidecarless lab down --name {self.name}` first")
        pods = parse_pods(str(pods_file), pods_file.read_text())
        errors = validate_policies(policies_dir)
        if errors:
            raise LabError("invalid policies:\n" + "\n".join(errors))
        try:
            self._up(pods, policies_dir, agent_options, prepare_agent, agent_capabilities, start_agent)
        except BaseException:
            self.down()
            raise

    def _up(
        self,
        pods: list[Pod],
        policies_dir: Path,
        agent_options: tuple[str, ...],
        prepare_agent: PrepareAgent | None,
        agent_capabilities: tuple[str, ...] | None,
        start_agent: bool,
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.agent_dir.mkdir(exist_ok=True)
        self._install_policies(policies_dir)
        node = self.node_netns
        _run("ip", "netns", "add", node)
        _run("ip", "-n", node, "link", "set", "lo", "up")
        _run("ip", "-n", node, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        self._sysctl(node, "net.ipv4.ip_forward", "1")
        placements = place(pods)
        if any(placement.ip6 for placement in placements):
            _run("ip", "-n", node, "addr", "add", f"{NODE_IP6}/128", "dev", "lo", "nodad")
            self._sysctl(node, "net.ipv6.conf.all.forwarding", "1")
        lab_pods: list[LabPod] = []
        for placement in placements:
            pod, ip, ip6, interface = placement.pod, placement.ip, placement.ip6, placement.interface
            netns = self.pod_netns(pod)
            self._join_node(netns, interface, ip, ip6)
            named = tuple((s.name, s.port, s.transport) for s in pod.serve if s.name is not None)
            lab_pod = LabPod(pod.name, pod.namespace, dict(pod.labels), ip, interface, netns, None, ip6=ip6)
            lab_pods.append(replace(lab_pod, service_account=pod.service_account, named_ports=named))
        self._write_hosts(lab_pods)
        lab_pods = [self._start_server(lab_pod, pod) for lab_pod, pod in zip(lab_pods, pods, strict=True)]
        if prepare_agent is not None:
            agent_options = (*agent_options, *prepare_agent(self, lab_pods))
        launch = {"agent_options": list(agent_options), "agent_capabilities": agent_capabilities}
        self._write_state(lab_pods, None, launch)
        self._write_endpoints(lab_pods)
        if start_agent:
            self._write_state(lab_pods, self._start_agent(), launch)
            self.wait_ready()

    def _join_node(self, netns: str, interface: str, ip: str, ip6: str = "") -> None:
        """A namespace joined to the node by a veth pair: a /32 (and a /128) address, the node as its gateway.
        IPv6 reaches the node by the link-local address on the node's side of every veth (DATAPATH.md)."""
        node = self.node_netns
        _run("ip", "netns", "add", netns)
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "-n", node, "link", "add", interface, "type", "veth", "peer", "name", "eth0", "netns", netns)
        if ip6:
            _run("ip", "-n", node, "addr", "add", f"{NODE_LINK_LOCAL6}/64", "dev", interface, "nodad")
        _run("ip", "-n", node, "link", "set", interface, "up")
        if ip:
            _run("ip", "-n", netns, "addr", "add", f"{ip}/32", "dev", "eth0")
        if ip6:
            _run("ip", "-n", netns, "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        if ip:
            _run("ip", "-n", netns, "route", "add", NODE_IP, "dev", "eth0", "scope", "link")
            _run("ip", "-n", netns, "route", "add", "default", "via", NODE_IP, "dev", "eth0")
            _run("ip", "-n", node, "route", "add", f"{ip}/32", "dev", interface)
        if ip6:
            _run("ip", "-n", netns, "-6", "route", "add", "default", "via", NODE_LINK_LOCAL6, "dev", "eth0")
            _run("ip", "-n", node, "-6", "route", "add", f"{ip6}/128", "dev", interface)

    def _sysctl(self, netns: str, key: str, value: str) -> None:
        _run("ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}")

    def _write_hosts(self, pods: list[LabPod]) -> None:
        lines = ["127.0.0.1 localhost", f"{NODE_IP} node"]
        if any(pod.ip6 for pod in pods):
            lines += ["::1 localhost", f"{NODE_IP6} node"]
        # Both addresses of a dual-stack pod under its names: `curl -4` and `curl -6` choose.
        lines += [
            f"{ip} {pod.name}" + (f" {pod.name}.{pod.namespace}" if pod.namespace else "")
            for pod in pods
            for ip in (pod.ip, pod.ip6)
            if ip
        ]
        for pod in pods:
            directory = Path("/etc/netns") / pod.netns
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text("\n".join(lines) + "\n")

    def _start_server(self, lab_pod: LabPod, pod: Pod) -> LabPod:
        if not pod.serve:
            return lab_pod
        ready_file = self.dir / f"server-{lab_pod.netns}.ready"
        command = [sys.executable, "-m", "sidecarless", "lab", "serve", "--ready-file", str(ready_file)]
        if lab_pod.ip6:
            command.append("--ipv6" if lab_pod.ip else "--ipv6-only")
        for serve in pod.serve:
            command += [f"--{serve.protocol}", str(serve.port)]
        with open(self.dir / f"server-{lab_pod.netns}.log", "ab") as log_file:
            process = subprocess.Popen(
                ["ip", "netns", "exec", lab_pod.netns, *command],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                env={**os.environ, "SIDECARLESS_POD": pod.key},
            )
        _wait_for(lambda: ready_file.exists() or process.poll() is not None, 20, f"server of {pod.key}")
        if process.poll() is not None:
            raise LabError(f"server of {pod.key} exited: {self._tail(self.dir / f'server-{lab_pod.netns}.log')}")
        return LabPod(**{**asdict(lab_pod), "server_pid": process.pid})

    def _write_endpoints(self, pods: list[LabPod]) -> None:
        endpoints = [
            {
                "name": p.name,
                "namespace": p.namespace,
                "labels": p.labels,
                "ip": p.ip,
                "ip6": p.ip6,
                "interface": p.interface,
                "service_account": p.service_account,
                "named_ports": [{"name": n, "port": port, "protocol": proto} for n, port, proto in p.named_ports],
            }
            for p in pods
            if not p.external
        ]
        node_ips = [NODE_IP, *([NODE_IP6] if any(p.ip6 for p in pods) else [])]
        node = {"ips": node_ips, "interfaces": [p.interface for p in pods if p.external]}
        _write_atomically(self.endpoints_file, json.dumps({"endpoints": endpoints, "node": node}, indent=2))

    def agent_command(self) -> list[str]:
        # nsenter, not `ip netns exec`: the latter remounts /sys and would hide bpffs (DATAPATH.md).
        state = self.read_state()
        capabilities = state.get("agent_capabilities")
        return [
            "nsenter", f"--net=/run/netns/{self.node_netns}", "--",
            *(with_only_capabilities(capabilities) if capabilities is not None else []),
            sys.executable, "-m", "sidecarless", "agent",
            "--policies", str(self.policies_dir),
            "--endpoints", str(self.endpoints_file),
            "--run-dir", str(self.agent_dir),
            "--pin-dir", self.pin_dir,
            "--node-name", self.node_name,
            *state.get("agent_options", []),
        ]  # fmt: skip

    def _start_agent(self) -> int:
        """The lab's supervisor, which starts the agent and restarts it when it exits."""
        command = [sys.executable, "-m", "sidecarless", "lab", "supervise", "--name", self.name]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        return process.pid

    def supervise(self) -> int:
        """Run as the lab's kubelet (`lab supervise`): the agent, restarted whenever it exits."""
        return supervise(self.agent_command(), self.dir / "agent.log", self.agent_record)

    def agent_pid(self) -> int | None:
        pid = read_record(self.agent_record).get("pid")
        return pid if isinstance(pid, int) and _alive(pid) else None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, policies_digest: str | None = None) -> None:
        """Until the agent says ready (and has read `policies_digest`, when given); fails with the reason."""
        last: list[str] = ["agent not answering"]
        starts_before = read_record(self.agent_record).get("starts", 0)

        def ready() -> bool:
            record = read_record(self.agent_record)
            if record.get("last_exit") not in (None, 0) and record.get("starts") != starts_before:
                raise LabError(f"agent exited with {record['last_exit']}: {self._tail(self.dir / 'agent.log')}")
            try:
                status = agent_status(self.agent_socket)
            except AgentUnreachable:
                return False
            last[:] = status["pending"]
            if policies_digest is not None and status["policies"]["digest"] != policies_digest:
                last[:] = ["policies not read yet"]
                return False
            return bool(status["ready"])

        try:
            _wait_for(ready, timeout_s, "the agent to be ready")
        except LabError as error:
            raise LabError(f"{error}; pending: {'; '.join(last)}") from None

    def _tail(self, path: Path, lines: int = 20) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # state
    def _write_state(self, pods: list[LabPod], supervisor_pid: int | None, launch: dict[str, Any]) -> None:
        """`launch`: how the agent is started (agent_options, agent_capabilities), for the supervisor's restarts."""
        state = {
            "name": self.name,
            "node_netns": self.node_netns,
            "supervisor_pid": supervisor_pid,
            **launch,
            "pods": [asdict(pod) for pod in pods],
        }
        _write_atomically(self.state_file, json.dumps(state, indent=2))

    def read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {self.name} (start one with `sidecarless lab up`)") from None
        return state

    def pods(self) -> list[LabPod]:
        return [
            LabPod(**{**pod, "named_ports": tuple(tuple(named) for named in pod.get("named_ports", ()))})
            for pod in self.read_state()["pods"]
        ]

    def find_pod(self, reference: str) -> LabPod:
        """A pod by `name` or `namespace/name`."""
        matches = [pod for pod in self.pods() if pod.is_named(reference)]
        if len(matches) != 1:
            known = ", ".join(pod.key for pod in self.pods())
            raise LabError(f"pod {reference!r} {'is ambiguous' if matches else 'not found'} (pods: {known})")
        return matches[0]

    def status(self) -> dict[str, Any]:
        state = self.read_state()
        record = read_record(self.agent_record)
        agent: dict[str, Any] = {
            "pid": self.agent_pid(),
            "starts": record.get("starts"),
            "last_exit": record.get("last_exit"),
            "ready": False,
        }
        envoy: dict[str, Any] = {"pid": None}
        try:
            status = agent_status(self.agent_socket)
            agent.update(ready=status["ready"], pending=status["pending"], policies=status["policies"])
            envoy = status["envoy"]
        except AgentUnreachable as error:
            agent["error"] = str(error)
        return {
            "name": self.name,
            "node_netns": self.node_netns,
            "agent": agent,
            "envoy": envoy,
            "pods": state["pods"],
        }

    # exec, apply
    def exec(self, pod_reference: str, command: list[str]) -> int:
        pod = self.find_pod(pod_reference)
        return subprocess.run(["ip", "netns", "exec", pod.netns, *command]).returncode

    def exec_command(self, pod_reference: str, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.find_pod(pod_reference).netns, *command]

    def apply(self, policies_dir: Path, timeout_s: float = 10.0) -> list[str]:
        """Replace the policy set; returns the errors of rejected files (their last good version stays).
        Returns once the agent has read the new set and is ready again."""
        errors = validate_policies(policies_dir)
        self._install_policies(policies_dir)
        self.wait_ready(timeout_s, policies_digest=directory_digest(self.policies_dir))
        return errors

    def _install_policies(self, source: Path) -> None:
        """Copy the policy files in, each replaced atomically: the agent never reads a half-written file."""
        self.policies_dir.mkdir(parents=True, exist_ok=True)
        wanted = {path.name: path.read_bytes() for path in policy_files(source)} if source.exists() else {}
        for name, content in wanted.items():
            _write_atomically(self.policies_dir / name, content)
        for path in policy_files(self.policies_dir):
            if path.name not in wanted:
                path.unlink()

    # down
    def down(self) -> None:
        """Remove everything this lab made; safe to call on a half-built or crashed lab."""
        try:
            state = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        if state.get("supervisor_pid"):
            _stop_process(state["supervisor_pid"])  # it stops the agent
        if (agent := self.agent_pid()) is not None:
            _stop_process(agent)
        for pod in state.get("pods", []):
            if pod.get("server_pid"):
                _stop_process(pod["server_pid"])
        prefix = f"{NETNS_PREFIX}{self.name}-"
        for netns in self._namespaces():
            if not netns.startswith(prefix):
                continue
            # Whatever still runs in this lab's namespaces was started by this lab (Envoy among them).
            for pid in _run("ip", "netns", "pids", netns, check=False).stdout.split():
                _stop_process(int(pid))
            _run("ip", "netns", "del", netns, check=False)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _namespaces() -> list[str]:
        return [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line.strip()]

    def envoy_stat(self, name: str) -> int:
        """An Envoy counter, read through its admin socket in the lab."""
        return asyncio.run(stat_value(self.agent_dir / "envoy-admin.sock", name))


def _write_atomically(path: Path, content: str | bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    if isinstance(content, str):
        temporary.write_text(content)
    else:
        temporary.write_bytes(content)
    os.replace(temporary, path)
