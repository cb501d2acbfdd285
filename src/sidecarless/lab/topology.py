"""The lab's nodes and pods, and the namespaces, links and routes that make them (DATAPATH.md): a namespace per
node and per pod, veth pairs created inside the node namespace (the root namespace is never touched), and for
several nodes a fabric (a bridge in a namespace of its own) with native routes between them.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sidecarless.lab.pods import NODE_LINK_LOCAL6, Placement, node_ip, node_ip6, pod_cidrs

LAB_ROOT = Path(os.environ.get("SIDECARLESS_LAB_ROOT", "/run/sidecarless/lab"))
BPF_PIN_ROOT = "/sys/fs/bpf/sidecarless"
NETNS_PREFIX = "scl-"
CGROUP_PREFIX = "sidecarless-lab-"  # a node's cgroup (socket acceleration): its pods' and its agent's processes


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
    node: str = ""  # the name of its node

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


@dataclass(frozen=True)
class LabNode:
    """One node of a lab: its namespace, its agent's files and pinned maps. Node 1 keeps the places a
    one-node lab has always had."""

    lab: str  # the lab's name
    name: str  # the node's name, as the agent and the API server know it
    index: int  # 1, 2, ...: its addresses and pod networks

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.lab}-node" + (str(self.index) if self.index > 1 else "")

    @property
    def dir(self) -> Path:
        return LAB_ROOT / self.lab / ("" if self.index == 1 else f"node{self.index}")

    @property
    def agent_dir(self) -> Path:
        return self.dir / "agent"

    @property
    def agent_record(self) -> Path:
        return self.dir / "agent.json"

    @property
    def agent_socket(self) -> Path:
        return self.agent_dir / "agent.sock"

    @property
    def agent_log(self) -> Path:
        return self.dir / "agent.log"

    @property
    def pin_dir(self) -> str:
        # "_" is in no lab name, so lab x's node 2 is never lab x-2's (bpffs refuses "." in a name).
        return f"{BPF_PIN_ROOT}/lab-{self.lab}" + (f"_{self.index}" if self.index > 1 else "")

    @property
    def cgroup(self) -> Path:
        """The cgroup v2 its pods, its agent and its Envoy run in when the lab accelerates sockets."""
        return cgroup2_root() / (f"{CGROUP_PREFIX}{self.lab}" + (f"_{self.index}" if self.index > 1 else ""))

    @property
    def ips(self) -> tuple[str, str]:
        return node_ip(self.index), node_ip6(self.index)

    def addresses(self, ipv6: bool) -> tuple[str, ...]:
        """Its addresses in the lab's families: IPv4, and IPv6 when the lab's pods have it."""
        return self.ips if ipv6 else self.ips[:1]


FABRIC_INTERFACE = "eth0"  # a node's link to the fabric, as a node's NIC


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a host with both versions."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise LabError("socket acceleration needs cgroup v2, and none is mounted (/proc/self/mounts)")


def in_cgroup(cgroup: Path | None, command: list[str]) -> list[str]:
    """`command`, run by a process that joins `cgroup` first (the sockets it opens are that cgroup's)."""
    if cgroup is None:
        return command
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *command]


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, text=True, capture_output=True)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def make_node(node: LabNode, ipv6: bool) -> None:
    """A node's namespace: its addresses on lo, forwarding on."""
    netns = node.netns
    run("ip", "netns", "add", netns)
    run("ip", "-n", netns, "link", "set", "lo", "up")
    run("ip", "-n", netns, "addr", "add", f"{node.ips[0]}/32", "dev", "lo")
    sysctl(netns, "net.ipv4.ip_forward", "1")
    if ipv6:
        run("ip", "-n", netns, "addr", "add", f"{node.ips[1]}/128", "dev", "lo", "nodad")
        sysctl(netns, "net.ipv6.conf.all.forwarding", "1")


def join_fabric(fabric: str, nodes: list[LabNode], placements: list[Placement], ipv6: bool) -> None:
    """Each node's eth0 on one bridge; on each node a route to every other node's address, pod networks
    and external hosts, through that node (IPv6: by its link-local address fe80::n on the fabric)."""
    run("ip", "netns", "add", fabric)
    run("ip", "-n", fabric, "link", "set", "lo", "up")
    run("ip", "-n", fabric, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", fabric, "link", "set", "br0", "up")
    for node in nodes:
        port = f"node{node.index}"
        run("ip", "-n", fabric, "link", "add", port, "type", "veth", "peer", "name", FABRIC_INTERFACE,
             "netns", node.netns)  # fmt: skip
        run("ip", "-n", fabric, "link", "set", port, "master", "br0", "up")
        if ipv6:
            run("ip", "-n", node.netns, "addr", "add", f"fe80::{node.index:x}/64", "dev", FABRIC_INTERFACE,
                 "nodad")  # fmt: skip
        run("ip", "-n", node.netns, "link", "set", FABRIC_INTERFACE, "up")
    for node in nodes:
        for other in nodes:
            if other is node:
                continue
            ip4, ip6 = other.ips
            pod_cidr4, pod_cidr6 = pod_cidrs(other.index)
            externals = [p for p in placements if p.node == other.index and p.pod.external_ip is not None]
            for prefix in (f"{ip4}/32", pod_cidr4, *(f"{p.ip}/32" for p in externals if p.ip)):
                run("ip", "-n", node.netns, "route", "add", prefix, "via", ip4, "dev", FABRIC_INTERFACE,
                     "onlink")  # fmt: skip
            if ipv6:
                for prefix in (f"{ip6}/128", pod_cidr6, *(f"{p.ip6}/128" for p in externals if p.ip6)):
                    run("ip", "-n", node.netns, "-6", "route", "add", prefix, "via", f"fe80::{other.index:x}",
                         "dev", FABRIC_INTERFACE)  # fmt: skip


def join_node(node: LabNode, netns: str, interface: str, ip: str, ip6: str = "") -> None:
    """A namespace joined to its node by a veth pair: a /32 (and a /128) address, the node as its gateway.
    IPv6 reaches the node by the link-local address on the node's side of every veth (DATAPATH.md)."""
    node_netns, gateway = node.netns, node.ips[0]
    run("ip", "netns", "add", netns)
    run("ip", "-n", netns, "link", "set", "lo", "up")
    run("ip", "-n", node_netns, "link", "add", interface, "type", "veth", "peer", "name", "eth0", "netns", netns)
    if ip6:
        run("ip", "-n", node_netns, "addr", "add", f"{NODE_LINK_LOCAL6}/64", "dev", interface, "nodad")
    run("ip", "-n", node_netns, "link", "set", interface, "up")
    if ip:
        run("ip", "-n", netns, "addr", "add", f"{ip}/32", "dev", "eth0")
    if ip6:
        run("ip", "-n", netns, "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
    run("ip", "-n", netns, "link", "set", "eth0", "up")
    if ip:
        run("ip", "-n", netns, "route", "add", gateway, "dev", "eth0", "scope", "link")
        run("ip", "-n", netns, "route", "add", "default", "via", gateway, "dev", "eth0")
        run("ip", "-n", node_netns, "route", "add", f"{ip}/32", "dev", interface)
    if ip6:
        run("ip", "-n", netns, "-6", "route", "add", "default", "via", NODE_LINK_LOCAL6, "dev", "eth0")
        run("ip", "-n", node_netns, "-6", "route", "add", f"{ip6}/128", "dev", interface)


def sysctl(netns: str, key: str, value: str) -> None:
    run("ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}")


def write_hosts(pods: list[LabPod], nodes: list[LabNode]) -> None:
    """`node` in a pod is its own node; with several nodes, each is also known by its name."""
    ipv6 = any(pod.ip6 for pod in pods)
    localhost = ["127.0.0.1 localhost", *(["::1 localhost"] if ipv6 else [])]
    # Both addresses of a dual-stack pod under its names: `curl -4` and `curl -6` choose.
    names = [
        f"{ip} {pod.name}" + (f" {pod.name}.{pod.namespace}" if pod.namespace else "")
        for pod in pods
        for ip in (pod.ip, pod.ip6)
        if ip
    ]
    if len(nodes) > 1:
        names += [f"{ip} {node.name}" for node in nodes for ip in node.addresses(ipv6)]
    for pod in pods:
        node = next(node for node in nodes if node.name == pod.node)
        lines = [*localhost, *(f"{ip} node" for ip in node.addresses(ipv6)), *names]
        directory = Path("/etc/netns") / pod.netns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text("\n".join(lines) + "\n")


def namespaces() -> list[str]:
    return [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()]
