"""What the commands share: reaching a running agent (`-H`, `--lab`), printing JSON or YAML, flag types."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TypeAlias

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return value


def concurrency_flag(text: str) -> int:
    """Envoy's worker threads: N, or auto (the CPUs it may use)."""
    from sidecarless.envoy.workers import concurrency

    try:
        return concurrency(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: a positive number or auto") from None


DEFAULT_AGENT_SOCKET = Path("/run/sidecarless/agent.sock")
OUTPUTS = ("text", "json", "yaml")


class UsageError(Exception):
    """A flag's value that cannot be used: one line on stderr, exit status 1 (cli/main.py)."""


def add_agent_client_options(parser: argparse.ArgumentParser) -> None:
    """-H, --lab and --node, taken before the command (`sidecarless -H unix:///run/... status`, as cilium-dbg)
    or after it. Their defaults are suppressed: a subcommand's own default would otherwise overwrite what was
    given before it."""
    parser.add_argument(
        "-H", "--host", default=argparse.SUPPRESS,
        help=f"the agent's API socket: a path or unix:///path (default {DEFAULT_AGENT_SOCKET})",
    )  # fmt: skip
    parser.add_argument("--lab", default=argparse.SUPPRESS, help="the agent of this lab")
    parser.add_argument(
        "--node", default=argparse.SUPPRESS, help="with --lab: the agent of this node of the lab (default: its first)"
    )


def agent_client_options() -> argparse.ArgumentParser:
    """Every command that talks to an agent: its socket, or a lab's agent."""
    options = argparse.ArgumentParser(add_help=False)
    add_agent_client_options(options)
    return options


def add_output_option(parser: argparse.ArgumentParser, outputs: tuple[str, ...] = OUTPUTS) -> None:
    parser.add_argument("-o", "--output", choices=outputs, default=outputs[0], help=f"{', '.join(outputs)}")


def socket_path(host: str) -> Path:
    """-H: a socket path, or a unix:// URI (`unix:///run/sidecarless/agent.sock`, as Docker and cilium-dbg)."""
    if host.startswith("unix://"):
        host = host.removeprefix("unix://")
    elif "://" in host:
        raise UsageError(f"-H {host}: the agent answers on a Unix socket: give a path or unix:///path")
    if not host:
        raise UsageError("-H: empty socket path")
    return Path(host)


def agent_socket(args: argparse.Namespace) -> Path:
    if getattr(args, "lab", None):
        from sidecarless.lab.node import Lab

        return Lab(args.lab).node(getattr(args, "node", None)).agent_socket
    return socket_path(args.host) if getattr(args, "host", None) else DEFAULT_AGENT_SOCKET


def get_json(args: argparse.Namespace, path: str) -> Any:
    from sidecarless.api.client import agent_get

    status, body = agent_get(agent_socket(args), path, timeout_s=10)
    if status != 200:
        raise SystemExit(f"{path}: {status} {body.strip()}")
    return json.loads(body)


def print_structured(value: Any, output: str) -> None:
    if output == "yaml":
        import yaml

        print(yaml.safe_dump(value, sort_keys=False), end="")
    else:
        print(json.dumps(value, indent=2))
