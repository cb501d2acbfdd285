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


def agent_client_options() -> argparse.ArgumentParser:
    """Every command that talks to an agent: its socket, or a lab's agent."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("-H", "--host", help=f"the agent's API socket (default {DEFAULT_AGENT_SOCKET})")
    options.add_argument("--lab", help="the agent of this lab")
    options.add_argument("--node", help="with --lab: the agent of this node of the lab (default: its first)")
    return options


DEFAULT_AGENT_SOCKET = Path("/run/sidecarless/agent.sock")


def agent_socket(args: argparse.Namespace) -> Path:
    if getattr(args, "lab", None):
        from sidecarless.lab.node import Lab

        return Lab(args.lab).node(getattr(args, "node", None)).agent_socket
    return Path(args.host) if getattr(args, "host", None) else DEFAULT_AGENT_SOCKET


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
