"""The sidecarless command line: noun then verb (`lab up`, `policy validate`), `-o json` on listings."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from sidecarless import __version__
from sidecarless.observe import logs


def _agent(args: argparse.Namespace) -> int:
    from sidecarless.agent.agent import Agent, AgentConfig
    from sidecarless.redirect.maps import ConntrackTimeouts, MapSizes
    from sidecarless.sources.kubernetes import KubernetesConfig

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
        l7_access_log_all=args.l7_access_log == "all",
        host_routing=args.host_routing,
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return value


def _runtime_value(item: str) -> tuple[str, object]:
    key, separator, value = item.partition("=")
    if not separator:
        raise SystemExit(f"--envoy-runtime {item!r}: expected KEY=VALUE")
    return key, int(value) if value.lstrip("-").isdigit() else value


def _policy_validate(args: argparse.Namespace) -> int:
    from sidecarless.policy.reader import PolicyFileError
    from sidecarless.sources.files import read_policy_file, validate_policies

    errors: list[str] = []
    count = 0
    for raw in args.paths:
        path = Path(raw)
        if path.is_dir():
            errors += validate_policies(path)
            count += 1
        elif path.is_file():
            count += 1
            try:
                read_policy_file(path, str(path))
            except PolicyFileError as error:
                errors += [str(item) for item in error.errors]
        else:
            errors.append(f"{path}: no such file or directory")
    if not errors and args.pods:
        errors += _capacity_errors(args)
    for line in errors:
        print(line)
    if not errors:
        print(f"{count} path(s) valid")
    return 1 if errors else 0


def _capacity_errors(args: argparse.Namespace) -> list[str]:
    """What the agent would say of these policies with these pods: the maps could not hold them."""
    from sidecarless.lab.pods import NODE_IP, PodsFileError, endpoints_of, parse_pods, place
    from sidecarless.policy.compile import compile_plan
    from sidecarless.policy.identity import TooManyIdentities
    from sidecarless.policy.model import Node
    from sidecarless.redirect.maps import MapSizes, capacity_problems
    from sidecarless.sources.files import policy_files, read_policy_file

    try:
        pods = parse_pods(args.pods, Path(args.pods).read_text())
    except (PodsFileError, OSError) as error:
        return [str(error)]
    policies = []
    for raw in args.paths:
        path = Path(raw)
        for file in policy_files(path) if path.is_dir() else [path]:
            policies += list(read_policy_file(file, str(file)).policies)
    try:
        plan = compile_plan(policies, endpoints_of(place(pods)), Node(ips=(NODE_IP,)))
    except TooManyIdentities as error:
        return [f"{args.pods}: {error}"]
    sizes = MapSizes(args.bpf_endpoints_map_max, args.bpf_ipcache_map_max, args.bpf_policy_map_max)
    locations = {policy.key: f"{policy.file}:{policy.line}" for policy in policies}
    return [f"{args.pods}: {problem}" for problem in capacity_problems(plan, sizes, locations)]


def _policy_trace(args: argparse.Namespace) -> int:
    from sidecarless.lab.pods import NODE_IP, PodsFileError, endpoints_of, parse_pods, place
    from sidecarless.policy.compile import compile_plan
    from sidecarless.policy.model import Node
    from sidecarless.policy.trace import Request, trace
    from sidecarless.sources.files import PolicyDirectory, validate_policies

    errors = validate_policies(Path(args.policies))
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    try:
        pods = parse_pods(args.pods, Path(args.pods).read_text())
    except PodsFileError as error:
        print(error, file=sys.stderr)
        return 1
    placements = place(pods)
    policy_set = PolicyDirectory(Path(args.policies)).read_if_changed()
    assert policy_set is not None
    plan = compile_plan(policy_set.policies, endpoints_of(placements), Node(ips=(NODE_IP,)), policy_set.secrets)
    addresses = {placement.pod.name: placement.ip for placement in placements if placement.pod.external_ip}
    http = args.proto is None or args.method is not None or args.path is not None
    request = None
    if http:
        headers = tuple((name.strip(), value.strip()) for name, _, value in (h.partition(":") for h in args.header))
        request = Request(args.method or "GET", args.path or "/", args.host, headers)
    try:
        result = trace(
            plan,
            addresses.get(args.source, args.source),
            addresses.get(args.destination, args.destination),
            args.port,
            (args.proto or "tcp").upper(),
            request,
        )
    except ValueError as error:
        print(f"policy trace: {error}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    status = f" (HTTP {result.status})" if result.status else ""
    proxy = f" through the proxy ({' + '.join(result.proxied)})" if result.proxied else " in the kernel"
    reason = f": {result.reason}" if result.reason and result.verdict == "dropped" else ""
    print(f"verdict: {result.verdict}{status}{proxy if result.verdict != 'dropped' else ''}{reason}")
    for step in result.steps:
        print(f"  {step}")
    return 0


def _datapath_uninstall(args: argparse.Namespace) -> int:
    from sidecarless.agent.node import uninstall

    for line in uninstall(Path(args.run_dir), args.pin_dir):
        print(line)
    return 0


DEFAULT_AGENT_SOCKET = Path("/run/sidecarless/agent.sock")


def _agent_socket(args: argparse.Namespace) -> Path:
    if getattr(args, "lab", None):
        from sidecarless.lab.node import Lab

        return Lab(args.lab).agent_socket
    return Path(args.host) if getattr(args, "host", None) else DEFAULT_AGENT_SOCKET


def _get_json(args: argparse.Namespace, path: str) -> Any:
    from sidecarless.api.client import agent_get

    status, body = agent_get(_agent_socket(args), path, timeout_s=10)
    if status != 200:
        raise SystemExit(f"{path}: {status} {body.strip()}")
    return json.loads(body)


def _print_structured(value: Any, output: str) -> None:
    if output == "yaml":
        import yaml

        print(yaml.safe_dump(value, sort_keys=False), end="")
    else:
        print(json.dumps(value, indent=2))


def _status(args: argparse.Namespace) -> int:
    from sidecarless.cli.views import status_text

    status = _get_json(args, "/v1/status")
    if args.output == "json":
        print(json.dumps(status, indent=2))
    else:
        print(status_text(status, args.verbose))
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from sidecarless.api.client import agent_stream
    from sidecarless.observe.events import Event, Peer

    query = {
        "type": args.type,
        **({"from": args.source} if args.source else {}),
        **({"to": args.destination} if args.destination else {}),
    }
    try:
        for line in agent_stream(_agent_socket(args), f"/v1/monitor?{urlencode(query)}"):
            if args.output == "json":
                print(line, flush=True)
                continue
            raw = json.loads(line)
            event = Event(**{**raw, "source": Peer(**raw["source"]), "destination": Peer(**raw["destination"])})
            print(event.text(), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


ENVOY_CONFIG_RESOURCES = {
    "listeners": "dynamic_listeners",
    "routes": "dynamic_route_configs",
    "clusters": "dynamic_active_clusters",
    "rbac": "dynamic_route_configs",
}


def _envoy_admin_text(args: argparse.Namespace, admin_path: str) -> str:
    from urllib.parse import quote

    from sidecarless.api.client import agent_get

    status, body = agent_get(_agent_socket(args), f"/v1/envoy/admin?path={quote(admin_path, safe='')}", timeout_s=10)
    if status != 200:
        raise SystemExit(f"envoy {admin_path}: {status} {body.strip()}")
    return body


def _envoy(args: argparse.Namespace) -> int:
    if args.envoy_command == "run":
        from sidecarless.envoy.process import exec_envoy

        exec_envoy(Path(args.run_dir), args.concurrency)
    if args.envoy_command == "config":
        dump = json.loads(_envoy_admin_text(args, f"/config_dump?resource={ENVOY_CONFIG_RESOURCES[args.what]}"))
        if args.what == "rbac" and args.output == "text":
            from sidecarless.cli.views import rbac_text

            pods = {endpoint["ip"]: endpoint["pod"] for endpoint in _get_json(args, "/v1/endpoints")}
            print(rbac_text(dump, pods))
        else:
            _print_structured(dump, "json" if args.output == "text" else args.output)
    elif args.envoy_command == "stats":
        suffix = f"?filter={args.filter}" if args.filter else ""
        print(_envoy_admin_text(args, f"/stats{suffix}"), end="")
    else:
        print(_envoy_admin_text(args, args.path), end="")
    return 0


def _bpf(args: argparse.Namespace) -> int:
    from sidecarless.cli.views import table

    if args.bpf_command == "maps":
        maps = _get_json(args, "/v1/bpf/maps")
        if args.output == "json":
            print(json.dumps(maps, indent=2))
        else:
            rows = [
                {"map": name, **fill, "pinned": f"{maps['pin_dir']}/{name}"}
                for name, fill in sorted(maps["maps"].items())
            ]
            print(table(rows, ["map", "entries", "max_entries", "pinned"]))
        return 0
    if args.bpf_command == "ct":
        flows = _get_json(args, "/v1/bpf/ct")
        if args.output == "json":
            print(json.dumps(flows, indent=2))
        else:
            print(table(flows, ["source", "destination", "protocol", "action", "flags", "revision", "expires_in_s"]))
        return 0
    from urllib.parse import quote

    entries = _get_json(args, f"/v1/bpf/policy?pod={quote(args.pod)}")
    if args.output == "json":
        print(json.dumps(entries, indent=2))
    else:
        print(
            table(entries, ["direction", "peer_identity", "peer_labels", "protocol", "ports", "action", "proxy_port"])
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sidecarless.cli.views import table

    if args.bench_command == "datapath":
        from sidecarless.bench import datapath

        result = datapath.run(args.smoke, Path(args.results))
        columns = ["mode", "rps", "p50_ms", "p90_ms", "p99_ms", "proxy_cpu_us_per_request", "proxy_rss_mib",
                   "rps_vs_baseline", "rps_vs_sidecar", "rps_vs_node-envoy-bare", "p99_vs_sidecar"]  # fmt: skip
        for key, title in (("modes", "keep-alive"), ("modes_close", "Connection: close")):
            if result[key]:
                print(f"\n{title}")
                print(table([{"mode": mode, **figures} for mode, figures in result[key].items()], columns))
        print("\nidle proxy memory against pods")
        print(table(result["memory"], list(result["memory"][0])))
        print(f"results: {result['file']}")
        return 0
    from sidecarless.bench.control_plane import run

    result = run(args.smoke, Path(args.results))
    columns = ["rules", "endpoints", "local_endpoints", "compile_ms", "render_ms", "bytes", "send_to_ack_ms",
               "change_to_enforced_p50_ms", "change_to_enforced_p99_ms", "agent_rss_mib", "envoy_rss_mib"]  # fmt: skip
    print(table(result["runs"], columns))
    print(f"results: {result['file']}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    from sidecarless.lab.node import Lab, LabError

    if args.lab_command == "serve":
        return _lab_serve(args)
    if args.lab_command == "supervise":
        return int(Lab(args.name).supervise())
    try:
        return _lab_command(args, Lab(args.name))
    except LabError as error:
        print(f"lab {args.name}: {error}", file=sys.stderr)
        return 1


def _lab_command(args: argparse.Namespace, lab: Any) -> int:
    if args.lab_command == "up":
        lab.up(Path(args.pods), Path(args.policies))
        print(f"lab {lab.name} is up: agent ready, policy enforced")
        return 0
    if args.lab_command == "down":
        lab.down()
        return 0
    if args.lab_command == "exec":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            print("lab exec: a command is required after --", file=sys.stderr)
            return 2
        return int(lab.exec(args.pod, command))
    if args.lab_command == "apply":
        errors = lab.apply(Path(args.policies))
        for line in errors:
            print(line, file=sys.stderr)
        print(
            f"lab {lab.name}: policies applied"
            + (f", {len(errors)} error(s): rejected files kept their last good version" if errors else "")
        )
        return 1 if errors else 0
    if args.lab_command == "status":
        status = lab.status()
        if args.output == "json":
            print(json.dumps(status, indent=2))
        else:
            _print_lab_status(status)
        return 0
    if args.lab_command == "test":
        return _lab_test(args)
    raise AssertionError(args.lab_command)


def _print_lab_status(status: dict[str, Any]) -> None:
    agent, envoy = status["agent"], status["envoy"]
    state = "ready" if agent["ready"] else "not ready: " + "; ".join(agent.get("pending", [agent.get("error", "")]))
    print(f"lab {status['name']} (node namespace {status['node_netns']})")
    print(f"agent  pid {agent['pid']}  {state}  (started {agent.get('starts')} time(s))")
    print(f"envoy  pid {envoy.get('pid')}  restarts {envoy.get('restarts', 0)}")
    print(f"{'POD':<28} {'IP':<14} {'INTERFACE':<10} LABELS")
    for pod in status["pods"]:
        labels = ",".join(f"{key}={value}" for key, value in sorted(pod["labels"].items()))
        print(f"{pod['namespace'] + '/' + pod['name']:<28} {pod['ip']:<14} {pod['interface']:<10} {labels}")


def _lab_test(args: argparse.Namespace) -> int:
    from sidecarless.lab.node import LabError
    from sidecarless.lab.scenario import run_scenario

    passed = failed = 0
    for scenario in args.scenarios:
        print(f"== {scenario}")
        try:
            outcomes = run_scenario(Path(scenario), args.name)
        except LabError as error:
            print(f"FAIL {scenario}: {error}")
            failed += 1
            continue
        passed += sum(outcome.passed for outcome in outcomes)
        failed += sum(not outcome.passed for outcome in outcomes)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _lab_serve(args: argparse.Namespace) -> int:
    from sidecarless.lab.servers import serve

    asyncio.run(serve(args.http, args.tcp, args.udp, Path(args.ready_file) if args.ready_file else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sidecarless.redirect.maps import ConntrackTimeouts, MapSizes

    parser = argparse.ArgumentParser(prog="sidecarless", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sidecarless {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

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
        agent.add_argument(flag, type=_positive_int, default=default, help=f"{what} (default {default})")
    agent.add_argument(
        "--conntrack-gc-interval", type=float, default=10.0, help="seconds between sweeps of expired flows"
    )
    agent.set_defaults(handler=_agent, parser=agent)

    # Every command that talks to an agent: its socket, or a lab's agent.
    agent_client = argparse.ArgumentParser(add_help=False)
    agent_client.add_argument("-H", "--host", help=f"the agent's API socket (default {DEFAULT_AGENT_SOCKET})")
    agent_client.add_argument("--lab", help="the agent of this lab")

    status = commands.add_parser("status", parents=[agent_client], help="the agent, Envoy, xDS, datapath")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    status.add_argument("--verbose", action="store_true")
    status.set_defaults(handler=_status)

    monitor = commands.add_parser("monitor", parents=[agent_client], help="drops, policy verdicts and L7 verdicts")
    monitor.add_argument("--type", choices=("all", "drop", "l7", "policy-verdict", "agent"), default="all")
    monitor.add_argument("--from", dest="source", help="only events from this pod")
    monitor.add_argument("--to", dest="destination", help="only events to this pod")
    monitor.add_argument("-o", "--output", choices=("text", "json"), default="text")
    monitor.set_defaults(handler=_monitor)

    envoy = commands.add_parser("envoy", help="inspect the node's Envoy (through the agent), or run it")
    envoy_commands = envoy.add_subparsers(dest="envoy_command", required=True)
    envoy_config = envoy_commands.add_parser("config", parents=[agent_client], help="what Envoy holds")
    envoy_config.add_argument("what", choices=tuple(ENVOY_CONFIG_RESOURCES))
    envoy_config.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    envoy_stats = envoy_commands.add_parser("stats", parents=[agent_client], help="Envoy's statistics")
    envoy_stats.add_argument("filter", nargs="?", help="a regular expression on stat names")
    envoy_admin = envoy_commands.add_parser("admin", parents=[agent_client], help="any admin path (GET)")
    envoy_admin.add_argument("path")
    envoy_run = envoy_commands.add_parser(
        "run", help="be the node's Envoy, from the bootstrap an `agent --envoy external` writes (its own container)"
    )
    envoy_run.add_argument("--run-dir", default="/run/sidecarless", help="the directory the agent shares")
    envoy_run.add_argument("--concurrency", type=int, default=1, help="Envoy worker threads")
    envoy.set_defaults(handler=_envoy)

    bpf = commands.add_parser("bpf", help="inspect the kernel datapath (through the agent)")
    bpf_commands = bpf.add_subparsers(dest="bpf_command", required=True)
    bpf_policy = bpf_commands.add_parser("policy", help="a pod's policy entries in the kernel")
    bpf_policy_commands = bpf_policy.add_subparsers(dest="bpf_policy_command", required=True)
    bpf_policy_get = bpf_policy_commands.add_parser("get", parents=[agent_client])
    bpf_policy_get.add_argument("pod")
    bpf_policy_get.add_argument("-o", "--output", choices=("text", "json"), default="text")
    bpf_maps = bpf_commands.add_parser("maps", parents=[agent_client], help="the pinned maps and their fill")
    bpf_maps.add_argument("-o", "--output", choices=("text", "json"), default="text")
    bpf_ct = bpf_commands.add_parser("ct", help="the kernel's tracked flows")
    bpf_ct_commands = bpf_ct.add_subparsers(dest="bpf_ct_command", required=True)
    bpf_ct_list = bpf_ct_commands.add_parser("list", parents=[agent_client])
    bpf_ct_list.add_argument("-o", "--output", choices=("text", "json"), default="text")
    bpf.set_defaults(handler=_bpf)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    control_plane = bench_commands.add_parser("control-plane", help="compile, render and push at scale, real Envoy")
    control_plane.add_argument("--smoke", action="store_true", help="one small case: checks the benchmark works")
    control_plane.add_argument("--results", default="bench/results", help="where the JSON result goes")
    datapath = bench_commands.add_parser(
        "datapath", help="baseline, sidecar, sidecarless L4/L7 and a bare node Envoy, side by side in the lab"
    )
    datapath.add_argument("--smoke", action="store_true", help="1-second runs, 3 pods: checks the benchmark works")
    datapath.add_argument("--results", default="bench/results", help="where the JSON result goes")
    bench.set_defaults(handler=_bench)

    datapath = commands.add_parser("datapath", help="the node's datapath")
    datapath_commands = datapath.add_subparsers(dest="datapath_command", required=True)
    uninstall = datapath_commands.add_parser(
        "uninstall", help="remove programs, maps, TPROXY rules and Envoy (run in the node namespace)"
    )
    uninstall.add_argument("--run-dir", default="/run/sidecarless")
    uninstall.add_argument("--pin-dir", default="/sys/fs/bpf/sidecarless/node")
    uninstall.set_defaults(handler=_datapath_uninstall)

    policy = commands.add_parser("policy", help="work with policy files offline")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    validate = policy_commands.add_parser("validate", help="check files or directories; every error as file:line")
    validate.add_argument("paths", nargs="+")
    validate.add_argument(
        "--pods", help="a lab pod file: also compile for these pods and check that the kernel maps can hold it"
    )
    validate.add_argument("--bpf-policy-map-max", type=_positive_int, default=sizes.policy)
    validate.add_argument("--bpf-ipcache-map-max", type=_positive_int, default=sizes.ipcache)
    validate.add_argument("--bpf-endpoints-map-max", type=_positive_int, default=sizes.endpoints)
    validate.set_defaults(handler=_policy_validate)
    trace = policy_commands.add_parser("trace", help="the verdict for one flow or request, offline")
    trace.add_argument("--pods", required=True, help="the lab's pod file")
    trace.add_argument("--policies", required=True)
    trace.add_argument("--from", dest="source", required=True, help="pod, external host or address")
    trace.add_argument("--to", dest="destination", required=True, help="pod, external host or address")
    trace.add_argument("--port", type=int, required=True)
    trace.add_argument("--proto", choices=("tcp", "udp"), help="a plain TCP/UDP exchange instead of HTTP")
    trace.add_argument("--method")
    trace.add_argument("--path")
    trace.add_argument("--host", help="Host header (default: destination:port)")
    trace.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    trace.add_argument("-o", "--output", choices=("text", "json"), default="text")
    trace.set_defaults(handler=_policy_trace)

    lab = commands.add_parser("lab", help="a hermetic node with pods in network namespaces")
    lab_commands = lab.add_subparsers(dest="lab_command", required=True)
    up = lab_commands.add_parser("up", help="create the node, pods and agent; return when policy is enforced")
    up.add_argument("--pods", required=True)
    up.add_argument("--policies", required=True)
    lab_commands.add_parser("down", help="remove everything the lab made")
    lab_commands.add_parser("supervise", help="(internal) run the lab's agent, restarting it like kubelet")
    exec_parser = lab_commands.add_parser("exec", help="run a command in a pod's network namespace")
    exec_parser.add_argument("pod")
    exec_parser.add_argument("command", nargs=argparse.REMAINDER)
    apply = lab_commands.add_parser("apply", help="replace the policy set while running")
    apply.add_argument("--policies", required=True)
    status = lab_commands.add_parser("status", help="pods, agent and Envoy")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    test = lab_commands.add_parser("test", help="run verdict tables, each in a fresh lab")
    test.add_argument("scenarios", nargs="+")
    for sub in (
        up,
        lab_commands.choices["down"],
        lab_commands.choices["supervise"],
        exec_parser,
        apply,
        status,
    ):
        sub.add_argument("--name", default="default", help="lab name (default: default)")
    test.add_argument("--name", default="test", help="lab name used for each scenario (default: test)")
    lab.set_defaults(handler=_lab)
    serve = lab_commands.add_parser("serve", help="(inside a pod) the lab's HTTP and TCP echo servers")
    serve.add_argument("--http", type=int, action="append", default=[])
    serve.add_argument("--tcp", type=int, action="append", default=[])
    serve.add_argument("--udp", type=int, action="append", default=[])
    serve.add_argument("--ready-file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result
