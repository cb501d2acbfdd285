"""`sidecarless lab`: a hermetic node with pods in network namespaces (up, down, exec, apply, status, test)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from sidecarless.cli.client import (
    Commands,
    UsageError,
    add_output_option,
    print_structured,
)


def _lab(args: argparse.Namespace) -> int:
    from sidecarless.lab.node import Lab
    from sidecarless.lab.topology import LabError

    if args.lab_command == "serve":
        return _lab_serve(args)
    if args.lab_command == "load":
        return _lab_load(args)
    name = lab_name(args)
    if args.lab_command == "supervise":
        return int(Lab(name).supervise(getattr(args, "node", None)))
    try:
        return _lab_command(args, Lab(name))
    except LabError as error:
        print(f"lab {name}: {error}", file=sys.stderr)
        return 1


def lab_name(args: argparse.Namespace) -> str:
    """--lab or --name (both accepted, before or after the command); `lab test` runs in a lab of its own."""
    return str(getattr(args, "lab", None) or ("test" if args.lab_command == "test" else "default"))


def _lab_command(args: argparse.Namespace, lab: Any) -> int:
    if args.lab_command in ("up", "apply"):
        from sidecarless.cli.progress import Progress

        if not Path(args.policies).is_dir():
            # A scenario without policies/ has none; a mistyped directory given here must not read as an empty
            # set, which would remove every policy in force.
            raise UsageError(f"--policies {args.policies}: no such directory (an empty one removes every policy)")

        lab.progress = progress = Progress()
        errors: list[str] = []
        try:
            if args.lab_command == "apply":
                errors = lab.apply(Path(args.policies))
            else:
                lab.up(Path(args.pods), Path(args.policies), sockmap=args.sockmap)
        finally:
            progress.done()  # cleared before the command's own output
        if args.lab_command == "up":
            print(f"lab {lab.name} is up: agent ready, policy enforced")
            return 0
        for line in errors:
            print(line, file=sys.stderr)
        print(
            f"lab {lab.name}: policies applied"
            + (f", {len(errors)} error(s): rejected files kept their last good version" if errors else "")
        )
        return 1 if errors else 0
    if args.lab_command == "down":
        lab.down()
        return 0
    if args.lab_command == "exec":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            print("lab exec: a command is required after --", file=sys.stderr)
            return 2
        return int(lab.exec(args.pod, command))
    if args.lab_command == "status":
        status = lab.status(getattr(args, "node", None))
        if args.output != "text":
            print_structured(status, args.output)
        else:
            _print_lab_status(status)
        return 0
    if args.lab_command == "test":
        return _lab_test(args)
    raise AssertionError(args.lab_command)


def _print_lab_status(status: dict[str, Any]) -> None:
    agent, envoy = status["agent"], status["envoy"]
    state = "ready" if agent["ready"] else "not ready: " + "; ".join(agent.get("pending", [agent.get("error", "")]))
    print(f"lab {status['name']} node {status['node']} (node namespace {status['node_netns']})")
    print(f"agent  pid {agent['pid']}  {state}  (started {agent.get('starts')} time(s))")
    print(f"envoy  pid {envoy.get('pid')}  restarts {envoy.get('restarts', 0)}")
    if len(status["nodes"]) > 1:
        for node in status["nodes"]:
            agent_pid, envoy_pid = node["agent"]["pid"], node["envoy"].get("pid")
            ready = "ready" if node["agent"]["ready"] else "not ready"
            print(f"node {node['name']:<20} agent pid {agent_pid}  {ready}  envoy pid {envoy_pid}")
    print(f"{'POD':<28} {'NODE':<16} {'IP':<14} {'IPV6':<20} {'INTERFACE':<10} LABELS")
    for pod in status["pods"]:
        labels = ",".join(f"{key}={value}" for key, value in sorted(pod["labels"].items()))
        name = pod["namespace"] + "/" + pod["name"]
        node = pod.get("node") or status["node"]
        print(
            f"{name:<28} {node:<16} {pod['ip'] or '-':<14} {pod.get('ip6') or '-':<20} {pod['interface']:<10} {labels}"
        )


def _lab_test(args: argparse.Namespace) -> int:
    from sidecarless.lab.scenario import run_scenario
    from sidecarless.lab.topology import LabError

    passed = failed = 0
    report = _coloured_report if sys.stdout.isatty() else print
    for scenario in args.scenarios:
        print(f"== {scenario}")
        try:
            outcomes = run_scenario(Path(scenario), lab_name(args), report)
        except (LabError, FileNotFoundError) as error:
            print(f"FAIL {scenario}: {error}")
            failed += 1
            continue
        passed += sum(outcome.passed for outcome in outcomes)
        failed += sum(not outcome.passed for outcome in outcomes)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _coloured_report(line: str) -> None:
    """A verdict table's rows on a terminal: ok green, FAIL red."""
    colour = {"ok": 32, "FAIL": 31}.get(line.split(" ", 1)[0])
    print(f"\033[{colour}m{line}\033[0m" if colour else line, flush=True)


def _lab_load(args: argparse.Namespace) -> int:
    import signal

    from sidecarless.lab.load import Expected, Load

    host, port = args.to
    try:
        expected = [Expected.parse(text) for text in args.expect or ["GET:/=200"]]
    except ValueError as error:
        print(f"lab load: --expect {error}", file=sys.stderr)
        return 2

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        load = Load(host, port, args.rate, expected, args.connections, args.h2c_rate)
        loop.add_signal_handler(signal.SIGUSR1, load.mark)
        return (await load.run(args.duration, stop)).summary()

    summary = asyncio.run(run())
    print(json.dumps(summary), flush=True)
    return 0 if summary["failed"] == 0 and summary["wrong"] == 0 else 1


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _lab_serve(args: argparse.Namespace) -> int:
    from sidecarless.lab.servers import serve

    hosts = ("::",) if args.ipv6_only else ("0.0.0.0", "::") if args.ipv6 else ("0.0.0.0",)
    asyncio.run(serve(args.http, args.tcp, args.udp, Path(args.ready_file) if args.ready_file else None, hosts))
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    lab = commands.add_parser("lab", help="a hermetic node with pods in network namespaces")
    public = "up, down, status, exec, apply, test, load"
    # `supervise` and `serve` are the lab's own processes: not listed (their help is suppressed and the list of
    # commands names only the public ones).
    lab_commands = lab.add_subparsers(dest="lab_command", required=True, metavar=f"{{{public.replace(' ', '')}}}")
    up = lab_commands.add_parser("up", help="create the node, pods and agent; return when policy is enforced")
    up.add_argument("--pods", required=True)
    up.add_argument("--policies", required=True)
    up.add_argument(
        "--sockmap", action=argparse.BooleanOptionalAction, default=None,
        help="accelerate sockets: each node's pods, agent and Envoy run in a cgroup the agent attaches sockmap to "
        "(default: off, or SIDECARLESS_LAB_SOCKMAP=1)",
    )  # fmt: skip
    down = lab_commands.add_parser("down", help="remove everything the lab made")
    supervise = lab_commands.add_parser("supervise")
    exec_parser = lab_commands.add_parser("exec", help="run a command in a pod's network namespace")
    exec_parser.add_argument("pod")
    exec_parser.add_argument("command", nargs=argparse.REMAINDER)
    apply = lab_commands.add_parser("apply", help="replace the policy set while running")
    apply.add_argument("--policies", required=True)
    status = lab_commands.add_parser("status", help="pods, agents and Envoys")
    add_output_option(status)
    for sub in (status, supervise):
        sub.add_argument("--node", default=argparse.SUPPRESS, help="the node whose agent (default: the first node)")
    test = lab_commands.add_parser("test", help="run verdict tables, each in a fresh lab")
    test.add_argument("scenarios", nargs="+")
    for sub in (up, down, supervise, exec_parser, apply, status, test):
        default = "test (each scenario in a fresh lab of that name)" if sub is test else "default"
        sub.add_argument(
            "--lab", "--name", dest="lab", default=argparse.SUPPRESS, help=f"lab name (default: {default})"
        )
    lab.set_defaults(handler=_lab)
    load = lab_commands.add_parser(
        "load", help="(inside a pod) a steady HTTP/1.1 load, every answer checked; JSON summary at the end"
    )
    load.add_argument("--to", required=True, type=host_port, help="HOST:PORT")
    load.add_argument("--rate", type=float, default=500.0, help="requests a second, half keep-alive (default 500)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds, or until SIGTERM (default 10)")
    load.add_argument("--connections", type=int, default=4, help="keep-alive connections (default 4)")
    load.add_argument(
        "--h2c-rate", type=float, default=0.0, help="also this many requests a second on one long-lived h2c connection"
    )
    load.add_argument("--expect", action="append", help="METHOD:PATH=STATUS, taken in turn (default GET:/=200)")
    load.description = "SIGTERM stops it early; SIGUSR1 marks a moment (how soon a request sent after it is answered)."
    serve = lab_commands.add_parser("serve", description="(inside a pod) the lab's HTTP and TCP echo servers")
    serve.add_argument("--http", type=int, action="append", default=[])
    serve.add_argument("--tcp", type=int, action="append", default=[])
    serve.add_argument("--udp", type=int, action="append", default=[])
    serve.add_argument("--ready-file")
    serve.add_argument("--ipv6", action="store_true", help="also listen on IPv6 (a dual-stack pod)")
    serve.add_argument("--ipv6-only", action="store_true", help="listen on IPv6 only (an IPv6-only pod)")
