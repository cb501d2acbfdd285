"""`sidecarless envoy`: the node's Envoy through the agent (config, stats, admin), or `envoy run` in a container
of its own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sidecarless.cli.client import (
    Commands,
    UsageError,
    add_output_option,
    agent_socket,
    concurrency_flag,
    get_json,
    print_structured,
)

ENVOY_CONFIG_RESOURCES = {
    "listener": "dynamic_listeners",
    "route": "dynamic_route_configs",
    "cluster": "dynamic_active_clusters",
    "rbac": "dynamic_route_configs",
}
# What Envoy's admin page calls its pages, and the names istioctl users reach for.
ADMIN_SHORTCUTS = {"serverinfo": "/server_info", "configdump": "/config_dump", "config": "/config_dump"}


def _envoy_admin_text(args: argparse.Namespace, admin_path: str) -> str:
    from urllib.parse import quote

    from sidecarless.api.client import agent_get

    status, body = agent_get(agent_socket(args), f"/v1/envoy/admin?path={quote(admin_path, safe='')}", timeout_s=10)
    if status != 200:
        raise SystemExit(f"envoy {admin_path}: {status} {body.strip()}")
    return body


def _envoy(args: argparse.Namespace) -> int:
    if args.envoy_command == "run":
        import asyncio

        from sidecarless.envoy.process import run_in_container

        if not Path(args.run_dir).is_dir():
            raise UsageError(f"--run-dir {args.run_dir}: no such directory (the one the agent shares, mounted here)")
        ready_file = Path(args.ready_file) if args.ready_file else None
        return asyncio.run(run_in_container(Path(args.run_dir), args.concurrency, args.drain_time_s, ready_file))
    if args.envoy_command == "restart":
        from sidecarless.api.client import agent_post

        query = f"?concurrency={args.concurrency}" if args.concurrency else ""
        status, body = agent_post(agent_socket(args), f"/v1/envoy/restart{query}", timeout_s=120)
        if status != 200:
            raise SystemExit(f"envoy restart: {body.strip()}")
        print_structured(json.loads(body), args.output)
        return 0
    if args.envoy_command == "config":
        return _envoy_config(args)
    if args.envoy_command == "stats":
        suffix = f"?filter={args.filter}" if args.filter else ""
        print(_envoy_admin_text(args, f"/stats{suffix}"), end="")
        return 0
    path = ADMIN_SHORTCUTS.get(args.path.strip("/"), args.path)
    print(_envoy_admin_text(args, path if path.startswith("/") else f"/{path}"), end="")
    return 0


def _envoy_config(args: argparse.Namespace) -> int:
    """As `istioctl proxy-config`: a short table by default, the dump with -o json|yaml; --pod, --port and
    --name keep only what they name."""
    from sidecarless.cli.views import cluster_rows, listener_rows, rbac_text, route_rows, table

    what = args.what.removesuffix("s")
    if args.port is not None and what != "listener":
        raise UsageError(f"envoy config {args.what}: --port filters listeners only")
    if args.pod is not None and what == "cluster":
        raise UsageError("envoy config cluster: the node's Envoy has no cluster per pod; use --name")
    dump = json.loads(_envoy_admin_text(args, f"/config_dump?resource={ENVOY_CONFIG_RESOURCES[what]}"))
    if what == "listener":
        dump, rows = listener_rows(dump, args.pod, args.port, args.name)
        columns = ["listener", "address", "chain", "match"]
    elif what == "cluster":
        dump, rows = cluster_rows(dump, args.name)
        columns = ["name", "type", "lb_policy"]
    else:
        dump, rows = route_rows(dump, args.pod, args.name)
        columns = ["name", "domains", "routes", "filters"]
    if args.output != "text":
        print_structured(dump, args.output)
    elif what == "rbac":
        endpoints = get_json(args, "/v1/endpoints")
        pods = {endpoint[key]: endpoint["pod"] for endpoint in endpoints for key in ("ip", "ip6") if endpoint[key]}
        print(rbac_text(dump, pods))
    else:
        print(table(rows, columns))
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    envoy = commands.add_parser("envoy", help="inspect the node's Envoy (through the agent), or run it")
    envoy_commands = envoy.add_subparsers(dest="envoy_command", required=True)
    envoy_config = envoy_commands.add_parser(
        "config", parents=[agent_client], help="what Envoy holds (as istioctl proxy-config): a table, or -o json|yaml"
    )
    envoy_config.add_argument(
        "what", choices=tuple(name for what in ENVOY_CONFIG_RESOURCES for name in (what, what + "s"))
    )
    envoy_config.add_argument("--pod", help="only this pod's filter chains or routes (namespace/name or name)")
    envoy_config.add_argument("--port", type=int, help="only the listener on this port")
    envoy_config.add_argument("--name", help="only the resource of this name")
    add_output_option(envoy_config)
    envoy_stats = envoy_commands.add_parser("stats", parents=[agent_client], help="Envoy's statistics")
    envoy_stats.add_argument("filter", nargs="?", help="a regular expression on stat names")
    envoy_admin = envoy_commands.add_parser("admin", parents=[agent_client], help="any admin path (GET)")
    envoy_admin.add_argument(
        "path", help="an admin path, its leading / optional: clusters, listeners, server_info (serverinfo), config_dump"
    )
    envoy_run = envoy_commands.add_parser(
        "run", help="be the node's Envoy, from the bootstrap an `agent --envoy external` writes (its own container)"
    )
    envoy_run.add_argument("--run-dir", default="/run/sidecarless", help="the directory the agent shares")
    envoy_run.add_argument(
        "--concurrency", type=concurrency_flag, default="auto", metavar="N|auto",
        help="Envoy's worker threads; auto (the default): the CPUs this container may use (its CPU limit, cpuset)",
    )  # fmt: skip
    envoy_run.add_argument("--drain-time-s", type=float, default=5.0, help="how long it drains on SIGTERM (a rollout)")
    envoy_run.add_argument("--ready-file", help="written once this Envoy is ready (the pod's readiness probe)")
    envoy_restart = envoy_commands.add_parser(
        "restart",
        parents=[agent_client],
        help="replace the node's Envoy without dropping a request (a new one on the same ports, then the old drained)",
    )
    envoy_restart.add_argument(
        "--concurrency", type=concurrency_flag, metavar="N|auto",
        help="the new Envoy's worker threads, kept from then on (default: as the running one's)",
    )  # fmt: skip
    add_output_option(envoy_restart, ("json", "yaml"))
    envoy.set_defaults(handler=_envoy)
