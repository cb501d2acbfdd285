"""A hermetic cluster of nodes in network namespaces (`lab up`, `down`, `exec`, `apply`, `status`).

The namespaces, links and routes are lab/topology.py's: node n owns 10.244.n.0/24 and fd00:10:244:n::/64, and
several nodes are joined by a fabric with native routing as in Cilium's native-routing mode, no overlay. Each
node runs its own agent (under a supervisor, as kubelet runs a DaemonSet pod), Envoy and datapath; every agent
reads the same policies and the same endpoints file (every pod, with its node). Everything a lab makes carries
its name (`scl-<name>-...`), and `down` finds it by that name, so it also cleans up after a crash half-way
through `up`.
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
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sidecarless.api.client import AgentUnreachable, agent_status
from sidecarless.envoy.admin import stat_value
from sidecarless.envoy.process import ADMIN_LINK
from sidecarless.lab import image
from sidecarless.lab.pods import Pod, node_names, parse_pods, place
from sidecarless.lab.supervisor import read_record, supervise
from sidecarless.lab.topology import (
    BPF_PIN_ROOT,
    CGROUP_PREFIX,
    FABRIC_INTERFACE,
    LAB_ROOT,
    NETNS_PREFIX,
    LabError,
    LabNode,
    LabPod,
    cgroup2_root,
    in_cgroup,
    join_fabric,
    join_node,
    make_node,
    namespaces,
    run,
    write_hosts,
)
from sidecarless.sources.files import directory_digest, policy_files, validate_policies

_LAB_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
ADMIN_SOCKET_TIMEOUT_S = 10.0
SOCKMAP_ENV = "SIDECARLESS_LAB_SOCKMAP"


# Runs for each node when the lab's pods exist, before the node's agent starts; returns more arguments for
# that node's agent.
PrepareAgent = Callable[["Lab", LabNode, list[LabPod]], tuple[str, ...]]


def with_only_capabilities(capabilities: list[str] | tuple[str, ...]) -> list[str]:
    """A command prefix that runs what follows with only these capabilities, as a container whose
    securityContext drops ALL and adds them. As root, exec gives a process every capability in its bounding
    set: the bounding set is what it may use."""
    return ["setpriv", "--bounding-set", ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)]), "--"]


def wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
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
        self.fabric_netns = f"{NETNS_PREFIX}{name}-fabric"
        # Told what `up` and `apply` wait for (the CLI shows it on a terminal).
        self.progress: Callable[[str], None] = lambda message: None

    # The nodes. A lab's first node answers for the lab where one node is meant (a one-node lab's).
    def nodes(self) -> list[LabNode]:
        try:
            entries = self.read_state()["nodes"]
        except LabError:
            return [self._default_node()]
        return [LabNode(self.name, entry["name"], entry["index"]) for entry in entries]

    def node(self, name: str | None = None) -> LabNode:
        """A node by name; None: the first."""
        nodes = self.nodes()
        if name is None:
            return nodes[0]
        for node in nodes:
            if node.name == name:
                return node
        raise LabError(f"node {name!r} not found (nodes: {', '.join(n.name for n in nodes)})")

    def _default_node(self) -> LabNode:
        return LabNode(self.name, f"lab-{self.name}", 1)

    @property
    def node_name(self) -> str:
        return self.node().name

    @property
    def node_netns(self) -> str:
        return self.node().netns

    @property
    def pin_dir(self) -> str:
        return self.node().pin_dir

    @property
    def agent_dir(self) -> Path:
        return self.node().agent_dir

    @property
    def agent_record(self) -> Path:
        return self.node().agent_record

    @property
    def agent_socket(self) -> Path:
        return self.node().agent_socket

    # Paths every node shares.
    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def policies_dir(self) -> Path:
        return self.dir / "policies"

    @property
    def endpoints_file(self) -> Path:
        return self.dir / "endpoints.json"

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
        nodes: Mapping[str, str] | None = None,
        agent_image: image.Image | None = None,
        sockmap: bool | None = None,
    ) -> None:
        """`nodes`: the node of each pod the file puts on none (pod key, or an external host's name -> node
        name). `start_agent` false: pods and nodes only, no agent, no programs (the benchmark's baseline).
        `agent_options`: extra agent arguments (e.g. --envoy-runtime KEY=VALUE). `prepare_agent` runs for each
        node once the pods exist, before the agents start, and returns more arguments for that node's agent
        (the fake Kubernetes API server starts there). `agent_capabilities`: run the agents (and their Envoys)
        with only these, as the DaemonSet's container does (e.g. ("NET_ADMIN", "BPF")); None: all of root's.
        `agent_image`: run each node's agent in a container of this image (lab/image.py), with those capabilities.
        `sockmap`: each node's pods, agent and Envoy run in a cgroup of the node's, and the agent accelerates
        their sockets (--sockmap-cgroup); None: off, unless SIDECARLESS_LAB_SOCKMAP is 1 (a whole suite with it)."""
        if sockmap is None:
            sockmap = os.environ.get(SOCKMAP_ENV) == "1"
        if self.state_file.exists() or self._default_node().netns in namespaces():
            raise LabError(f"lab {self.name} exists; `sidecarless lab down --name {self.name}` first")
        pods = [
            replace(pod, node=pod.node or (nodes or {}).get(pod.key, ""))
            for pod in parse_pods(str(pods_file), pods_file.read_text())
        ]
        errors = validate_policies(policies_dir)
        if errors:
            raise LabError("invalid policies:\n" + "\n".join(errors))
        try:
            self._up(pods, policies_dir, agent_options, prepare_agent, agent_capabilities, start_agent, agent_image,
                     sockmap)  # fmt: skip
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
        agent_image: image.Image | None = None,
        sockmap: bool = False,
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._install_policies(policies_dir)
        names = node_names(pods)
        nodes = [LabNode(self.name, name, index) for index, name in enumerate(names, 1)] or [self._default_node()]
        placements = place(pods)
        ipv6 = any(placement.ip6 for placement in placements)
        for node in nodes:
            self.progress(f"creating node {node.name}")
            node.agent_dir.mkdir(parents=True, exist_ok=True)
            make_node(node, ipv6)
            if sockmap:
                node.cgroup.mkdir(exist_ok=True)
        if len(nodes) > 1:
            join_fabric(self.fabric_netns, nodes, placements, ipv6)
        lab_pods: list[LabPod] = []
        for placement in placements:
            pod, ip, ip6, interface = placement.pod, placement.ip, placement.ip6, placement.interface
            node = nodes[placement.node - 1]
            netns = self.pod_netns(pod)
            join_node(node, netns, interface, ip, ip6)
            named = tuple((s.name, s.port, s.transport) for s in pod.serve if s.name is not None)
            lab_pod = LabPod(pod.name, pod.namespace, dict(pod.labels), ip, interface, netns, None, ip6=ip6)
            lab_pods.append(replace(lab_pod, service_account=pod.service_account, named_ports=named, node=node.name))
        write_hosts(lab_pods, nodes)
        self.progress(f"starting the servers of {len(lab_pods)} pods")
        cgroups = {node.name: node.cgroup if sockmap else None for node in nodes}
        lab_pods = [
            self._start_server(lab_pod, pod, cgroups[lab_pod.node]) for lab_pod, pod in zip(lab_pods, pods, strict=True)
        ]
        launch: dict[str, Any] = {
            "sockmap": sockmap,
            "agent_options": list(agent_options),
            "agent_capabilities": agent_capabilities,
            "agent_image": asdict(agent_image) if agent_image is not None else None,
        }
        self._write_state(lab_pods, nodes, launch)
        if prepare_agent is not None:
            launch["node_agent_options"] = {node.name: list(prepare_agent(self, node, lab_pods)) for node in nodes}
            self._write_state(lab_pods, nodes, launch)
        self._write_endpoints(lab_pods, nodes, ipv6)
        if start_agent:
            self.progress("starting the agent (BCC compiles the datapath: up to a minute)")
            self._write_state(lab_pods, nodes, launch, {node.name: self._start_agent(node) for node in nodes})
            self.wait_ready()

    def _start_server(self, lab_pod: LabPod, pod: Pod, cgroup: Path | None) -> LabPod:
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
                in_cgroup(cgroup, ["ip", "netns", "exec", lab_pod.netns, *command]),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                env={**os.environ, "SIDECARLESS_POD": pod.key},
            )
        wait_for(lambda: ready_file.exists() or process.poll() is not None, 20, f"server of {pod.key}")
        if process.poll() is not None:
            raise LabError(f"server of {pod.key} exited: {self._tail(self.dir / f'server-{lab_pod.netns}.log')}")
        return LabPod(**{**asdict(lab_pod), "server_pid": process.pid})

    def _write_endpoints(self, pods: list[LabPod], nodes: list[LabNode], ipv6: bool) -> None:
        """One file for every node: each pod with its node, each node with its addresses and the interfaces
        that are no pod's (external hosts, the fabric)."""
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
                "node": p.node,
            }
            for p in pods
            if not p.external
        ]
        entries = [
            {"name": node.name, "ips": list(node.addresses(ipv6)), "interfaces": self.devices(node, pods)}
            for node in nodes
        ]
        _write_atomically(self.endpoints_file, json.dumps({"endpoints": endpoints, "nodes": entries}, indent=2))

    def devices(self, node: LabNode, pods: list[LabPod]) -> list[str]:
        """A node's interfaces that are no pod's, which traffic enters it by: its external hosts', the fabric."""
        fabric = [FABRIC_INTERFACE] if len(self.nodes()) > 1 else []
        return [pod.interface for pod in pods if pod.external and pod.node == node.name] + fabric

    def agent_command(self, node_name: str | None = None) -> list[str]:
        # nsenter, not `ip netns exec`: the latter remounts /sys and would hide bpffs (DATAPATH.md).
        state, node = self.read_state(), self.node(node_name)
        capabilities = state.get("agent_capabilities")
        if state.get("agent_image") is not None:
            return image.agent_command(
                image.Image(**state["agent_image"]), self.name, node.name, node.netns, capabilities or (),
                self.dir, node.agent_dir,
                [
                    "--policies", f"{image.LAB_DIR}/{self.policies_dir.relative_to(self.dir)}",
                    "--endpoints", f"{image.LAB_DIR}/{self.endpoints_file.relative_to(self.dir)}",
                    "--run-dir", image.RUN_DIR, "--pin-dir", node.pin_dir, "--node-name", node.name,
                    *state.get("agent_options", []), *state.get("node_agent_options", {}).get(node.name, []),
                ],
            )  # fmt: skip
        return [
            "nsenter", f"--net=/run/netns/{node.netns}", "--",
            *(with_only_capabilities(capabilities) if capabilities is not None else []),
            sys.executable, "-m", "sidecarless", "agent",
            "--policies", str(self.policies_dir),
            "--endpoints", str(self.endpoints_file),
            "--run-dir", str(node.agent_dir),
            "--pin-dir", node.pin_dir,
            "--node-name", node.name,
            *state.get("agent_options", []),
            *state.get("node_agent_options", {}).get(node.name, []),
            *(["--sockmap-cgroup", str(node.cgroup)] if state.get("sockmap") else []),
        ]  # fmt: skip

    def _start_agent(self, node: LabNode) -> int:
        """The node's supervisor, which starts its agent and restarts it when it exits."""
        command = [sys.executable, "-m", "sidecarless", "lab", "supervise", "--name", self.name, "--node", node.name]
        process = subprocess.Popen(
            in_cgroup(self.cgroup_of(node.name), command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return process.pid

    def supervise(self, node_name: str | None = None) -> int:
        """Run as a node's kubelet (`lab supervise`): its agent, restarted whenever it exits."""
        node = self.node(node_name)
        return supervise(self.agent_command(node.name), node.agent_log, node.agent_record)

    def supervisor_pid(self, node_name: str | None = None) -> int | None:
        """The pid of a node's supervisor (its kubelet)."""
        name = self.node(node_name).name
        pid = next(entry["supervisor_pid"] for entry in self.read_state()["nodes"] if entry["name"] == name)
        return pid if isinstance(pid, int) else None

    def agent_pid(self, node_name: str | None = None) -> int | None:
        pid = read_record(self.node(node_name).agent_record).get("pid")
        return pid if isinstance(pid, int) and _alive(pid) else None

    def wait_ready(
        self, timeout_s: float = READY_TIMEOUT_S, policies_digest: str | None = None, node_name: str | None = None
    ) -> None:
        """Until every node's agent (or `node_name`'s) says ready (and has read `policies_digest`, when given);
        fails with the reason."""
        nodes = self.nodes() if node_name is None else [self.node(node_name)]
        deadline = time.monotonic() + timeout_s
        for node in nodes:
            self._wait_node_ready(node, max(deadline - time.monotonic(), 0.1), policies_digest, len(nodes) > 1)

    def _wait_node_ready(self, node: LabNode, timeout_s: float, policies_digest: str | None, named: bool) -> None:
        last: list[str] = ["agent not answering"]
        starts_before = read_record(node.agent_record).get("starts", 0)
        agent = f"the agent of node {node.name}" if named else "the agent"

        def ready() -> bool:
            record = read_record(node.agent_record)
            if record.get("last_exit") not in (None, 0) and record.get("starts") != starts_before:
                raise LabError(f"{agent} exited with {record['last_exit']}: {self._tail(node.agent_log)}")
            try:
                status = agent_status(node.agent_socket)
            except AgentUnreachable:
                return False
            last[:] = status["pending"]
            self.progress(f"waiting for {agent}: {'; '.join(last) or 'ready'}")
            if policies_digest is not None and status["policies"]["digest"] != policies_digest:
                last[:] = ["policies not read yet"]
                return False
            return bool(status["ready"])

        try:
            wait_for(ready, timeout_s, f"{agent} to be ready")
        except LabError as error:
            raise LabError(f"{error}; pending: {'; '.join(last)}") from None

    def _tail(self, path: Path, lines: int = 20) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # state
    def _write_state(
        self,
        pods: list[LabPod],
        nodes: list[LabNode],
        launch: dict[str, Any],
        supervisors: dict[str, int] | None = None,
    ) -> None:
        """`launch`: how the agents are started (agent_options, agent_capabilities, node_agent_options), for
        the supervisors' restarts; `supervisors`: each node's supervisor pid."""
        state = {
            "name": self.name,
            "nodes": [
                {"name": n.name, "index": n.index, "netns": n.netns, "supervisor_pid": (supervisors or {}).get(n.name)}
                for n in nodes
            ],
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

    def status(self, node_name: str | None = None) -> dict[str, Any]:
        """The lab as one node sees it (the first, or `node_name`), every node's agent in `nodes`."""
        state = self.read_state()
        node = self.node(node_name)
        nodes = [self._node_status(n) for n in self.nodes()]
        own = next(n for n in nodes if n["name"] == node.name)
        return {
            "name": self.name,
            "node": node.name,
            "node_netns": node.netns,
            "agent": own["agent"],
            "envoy": own["envoy"],
            "nodes": nodes,
            "pods": state["pods"],
        }

    def _node_status(self, node: LabNode) -> dict[str, Any]:
        record = read_record(node.agent_record)
        agent: dict[str, Any] = {
            "pid": self.agent_pid(node.name),
            "starts": record.get("starts"),
            "last_exit": record.get("last_exit"),
            "ready": False,
        }
        envoy: dict[str, Any] = {"pid": None}
        try:
            status = agent_status(node.agent_socket)
            agent.update(ready=status["ready"], pending=status["pending"], policies=status["policies"])
            envoy = status["envoy"]
        except AgentUnreachable as error:
            agent["error"] = str(error)
        return {"name": node.name, "netns": node.netns, "agent": agent, "envoy": envoy}

    # exec, apply
    def exec(self, pod_reference: str, command: list[str]) -> int:
        return subprocess.run(self.exec_command(pod_reference, command)).returncode

    def exec_command(self, pod_reference: str, command: list[str]) -> list[str]:
        """`command` in the pod (and in its node's cgroup, where the lab accelerates sockets)."""
        pod = self.find_pod(pod_reference)
        return in_cgroup(self.cgroup_of(pod.node), ["ip", "netns", "exec", pod.netns, *command])

    def cgroup_of(self, node_name: str) -> Path | None:
        """The cgroup the node's processes run in, where the lab accelerates sockets; else None."""
        return self.node(node_name or None).cgroup if self.read_state().get("sockmap") else None

    def apply(self, policies_dir: Path, timeout_s: float = 10.0) -> list[str]:
        """Replace the policy set; returns the errors of rejected files (their last good version stays).
        Returns once every node's agent has read the new set and is ready again."""
        self.read_state()  # no such lab: said so, and nothing made for it
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
        nodes = [LabNode(self.name, n["name"], n["index"]) for n in state.get("nodes", [])] or [self._default_node()]
        for entry in state.get("nodes", []):
            if entry.get("supervisor_pid"):
                _stop_process(entry["supervisor_pid"])  # it stops the agent
        for node in nodes:
            pid = read_record(node.agent_record).get("pid")
            if isinstance(pid, int) and _alive(pid):
                _stop_process(pid)
        for pod in state.get("pods", []):
            if pod.get("server_pid"):
                _stop_process(pod["server_pid"])
        prefix = f"{NETNS_PREFIX}{self.name}-"
        for netns in namespaces():
            if not netns.startswith(prefix):
                continue
            # Whatever still runs in this lab's namespaces was started by this lab (Envoy among them).
            for pid in run("ip", "netns", "pids", netns, check=False).stdout.split():
                _stop_process(int(pid))
            run("ip", "netns", "del", netns, check=False)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        # Every node's pinned maps: lab-NAME, lab-NAME_2, ... (also those a crashed `up` left).
        for pinned in [Path(self._default_node().pin_dir), *Path(BPF_PIN_ROOT).glob(f"lab-{self.name}_*")]:
            shutil.rmtree(pinned, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        self._remove_cgroups()  # also those of an `up` that failed before it wrote the state

    def _remove_cgroups(self) -> None:
        """Each node's cgroup, once the processes stopped above have left it (a cgroup with a process in it
        cannot be removed)."""
        try:
            root = cgroup2_root()
        except LabError:
            return  # none made: the lab accelerates sockets only where cgroup v2 is mounted
        for cgroup in [root / f"{CGROUP_PREFIX}{self.name}", *root.glob(f"{CGROUP_PREFIX}{self.name}_*")]:
            if not cgroup.exists():
                continue

            def removed(cgroup: Path = cgroup) -> bool:
                try:
                    cgroup.rmdir()
                except OSError:
                    return False
                return True

            wait_for(removed, STOP_TIMEOUT_S, f"cgroup {cgroup} to empty")

    def envoy_stat(self, name: str, node_name: str | None = None) -> int:
        """An Envoy counter, read through its admin socket in the lab. Envoy opens that socket once its first
        configuration is in place, a moment after it ACKed it (the agent is ready then): waited for."""
        admin = self.node(node_name).agent_dir / ADMIN_LINK
        wait_for(admin.exists, ADMIN_SOCKET_TIMEOUT_S, f"Envoy's admin socket {admin}", interval_s=0.02)
        return asyncio.run(stat_value(admin, name))


def _write_atomically(path: Path, content: str | bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    if isinstance(content, str):
        temporary.write_text(content)
    else:
        temporary.write_bytes(content)
    os.replace(temporary, path)
