"""`sidecarless status` and `sidecarless monitor`: what a running agent says, and its events as they happen."""

from __future__ import annotations

import argparse
import json

from sidecarless.cli.client import (
    Commands,
    agent_socket,
    get_json,
)
from sidecarless.observe.events import EVENT_TYPES


def _status(args: argparse.Namespace) -> int:
    from sidecarless.cli.views import status_text

    status = get_json(args, "/v1/status")
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
        for line in agent_stream(agent_socket(args), f"/v1/monitor?{urlencode(query)}"):
            if args.output == "json":
                print(line, flush=True)
                continue
            raw = json.loads(line)
            event = Event(**{**raw, "source": Peer(**raw["source"]), "destination": Peer(**raw["destination"])})
            print(event.text(), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    status = commands.add_parser("status", parents=[agent_client], help="the agent, Envoy, xDS, datapath")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    status.add_argument("--verbose", action="store_true")
    status.set_defaults(handler=_status)

    monitor = commands.add_parser("monitor", parents=[agent_client], help="drops, policy verdicts and L7 verdicts")
    monitor.add_argument("--type", choices=("all", *EVENT_TYPES), default="all")
    monitor.add_argument("--from", dest="source", help="only events from this pod")
    monitor.add_argument("--to", dest="destination", help="only events to this pod")
    monitor.add_argument("-o", "--output", choices=("text", "json"), default="text")
    monitor.set_defaults(handler=_monitor)
