"""The sidecarless command line: noun then verb (`lab up`, `policy validate`), `-o json` on listings."""

from __future__ import annotations

import argparse
import sys

from sidecarless import __version__
from sidecarless.cli import agent, bench, bpf, envoy, lab, policy, status
from sidecarless.cli.client import UsageError, add_agent_client_options, agent_client_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecarless", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sidecarless {__version__}")
    add_agent_client_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    agent_client = agent_client_options()
    # In the order `--help` lists them.
    for noun in (agent, status, envoy, bpf, bench, policy, lab):
        noun.add_commands(commands, agent_client)
    return parser


def main(argv: list[str] | None = None) -> int:
    """A user's mistake (no agent where one was named, a file that does not parse) is one line on stderr and exit
    status 1, never a traceback; a traceback is a bug."""
    from sidecarless.api.client import AgentUnreachable
    from sidecarless.lab.pods import PodsFileError
    from sidecarless.lab.topology import LabError
    from sidecarless.policy.reader import PolicyFileError
    from sidecarless.sources.kubernetes_config import KubeConfigError

    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except AgentUnreachable as error:
        print(f"sidecarless: {unreachable_message(args, error)}", file=sys.stderr)
        return 1
    except (PodsFileError, PolicyFileError, LabError, UsageError, KubeConfigError) as error:
        print(f"sidecarless: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        # A file named on the command line that is not there or not readable.
        print(f"sidecarless: {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    return result


def unreachable_message(args: argparse.Namespace, error: Exception) -> str:
    """What does not answer, and how to start it."""
    if getattr(args, "lab", None):
        return (
            f"the agent of lab {args.lab} does not answer ({error}); is the lab up? "
            f"`sidecarless lab status --lab {args.lab}`, or start one with `sidecarless lab up --lab {args.lab} ...`"
        )
    return (
        f"no agent answers on {error}; start one (`sidecarless agent --policies DIR --endpoints FILE`, or the "
        "DaemonSet), or name its socket with -H"
    )
