"""`sidecarless envoy`: the node's Envoy through the agent (config, stats, admin), or `envoy run` in a container
of its own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sidecarless.cli.client import (
    Commands,
    agent_socket,
    get_json,
    print_structured,
)

ENVOY_CONFIG_RESOURCES = {
    "listeners": "dynamic_listeners",
    "routes": "dynamic_route_configs",
    "clusters": "dynamic_active_clusters",
    "rbac": "dynamic_route_configs",
}


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

        ready_file = Path(args.ready_file) if args.ready_file else None
        return asyncio.run(run_in_container(Path(args.run_dir), args.concurrency, args.drain_time_s, ready_file))
    if args.envoy_command == "restart":
        from sidecarless.api.client import agent_post

        status, body = agent_post(agent_socket(args), "/v1/envoy/restart", timeout_s=120)
        if status != 200:
            raise SystemExit(f"envoy restart: {body.strip()}")
        print_structured(json.loads(body), args.output if args.output != "text" else "json")
        return 0
    if args.envoy_command == "config":
        dump = json.loads(_envoy_admin_text(args, f"/config_dump?resource={ENVOY_CONFIG_RESOURCES[args.what]}"))
        if args.what == "rbac" and args.output == "text":
            from sidecarless.cli.views import rbac_text

            endpoints = get_json(args, "/v1/endpoints")
            pods = {endpoint[key]: endpoint["pod"] for endpoint in endpoints for key in ("ip", "ip6") if endpoint[key]}
            print(rbac_text(dump, pods))
        else:
            print_structured(dump, "json" if args.output == "text" else args.output)
    elif args.envoy_command == "stats":
        suffix = f"?filter={args.filter}" if args.filter else ""
        print(_envoy_admin_text(args, f"/stats{suffix}"), end="")
    else:
        print(_envoy_admin_text(args, args.path), end="")
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
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
    envoy_run.add_argument("--drain-time-s", type=float, default=5.0, help="how long it drains on SIGTERM (a rollout)")
    envoy_run.add_argument("--ready-file", help="written once this Envoy is ready (the pod's readiness probe)")
    envoy_restart = envoy_commands.add_parser(
        "restart",
        parents=[agent_client],
        help="replace the node's Envoy without dropping a request (a new one on the same ports, then the old drained)",
    )
    envoy_restart.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    envoy.set_defaults(handler=_envoy)
