"""The sidecarless command line: noun then verb (`lab up`, `policy validate`), `-o json` on listings."""

from __future__ import annotations

import argparse

from sidecarless import __version__
from sidecarless.cli import agent, bench, bpf, envoy, lab, policy, status
from sidecarless.cli.client import agent_client_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecarless", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sidecarless {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    agent_client = agent_client_options()
    # In the order `--help` lists them.
    for noun in (agent, status, envoy, bpf, bench, policy, lab):
        noun.add_commands(commands, agent_client)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result
