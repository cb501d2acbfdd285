"""`sidecarless status` and `sidecarless monitor`: what a running agent says, and its events as they happen."""

from __future__ import annotations

import argparse
import json
import sys

from sidecarless.cli.client import (
    Commands,
    UsageError,
    add_output_option,
    agent_socket,
    get_json,
    positive_int,
    print_structured,
)
from sidecarless.observe.events import EVENT_TYPES, VERDICTS, EventFilter


def _status(args: argparse.Namespace) -> int:
    from sidecarless.cli.views import status_brief, status_text

    status = get_json(args, "/v1/status")
    if args.brief:
        # `cilium status --brief`: one line, and the exit status says it.
        line, healthy = status_brief(status)
        print(line)
        return 0 if healthy else 1
    if args.output != "text":
        print_structured(status, args.output)
    else:
        print(status_text(status, args.verbose))
    return 0


def monitor_filter(args: argparse.Namespace) -> EventFilter:
    try:
        return EventFilter(
            types=tuple(kind for kind in args.type or () if kind != "all"),
            from_pods=tuple(args.from_pod or ()),
            to_pods=tuple(args.to_pod or ()),
            pods=tuple(args.pod or ()),
            namespaces=tuple(args.namespace or ()),
            verdicts=tuple(args.verdict or ()),  # upper-cased by the flag's type
            http_statuses=tuple(args.http_status or ()),
        )
    except ValueError as error:
        raise UsageError(f"monitor: {error}") from None


def _monitor(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from sidecarless.api.client import agent_stream
    from sidecarless.cli.views import event_colour
    from sidecarless.observe.events import Event, Peer

    query = monitor_filter(args).query()
    if args.last is not None:
        query += [("last", str(args.last)), ("follow", "1" if args.follow else "0")]
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    try:
        for line in agent_stream(agent_socket(args), f"/v1/monitor?{urlencode(query)}"):
            if args.output == "json":
                print(line, flush=True)
                continue
            raw = json.loads(line)
            event = Event(**{**raw, "source": Peer(**raw["source"]), "destination": Peer(**raw["destination"])})
            print(event_colour(event, event.text()) if colour else event.text(), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    status = commands.add_parser("status", parents=[agent_client], help="the agent, Envoy, xDS, datapath")
    add_output_option(status)
    status.add_argument("--verbose", action="store_true")
    status.add_argument("--brief", action="store_true", help="one line, OK or what is wrong; exit status 1 if not OK")
    status.set_defaults(handler=_status)

    monitor = commands.add_parser(
        "monitor",
        parents=[agent_client],
        help="drops, policy verdicts and L7 verdicts (flags as hubble observe)",
        description="Follows events as they happen (as cilium monitor). --last N shows the last N recorded ones "
        "and stops, unless -f follows on. Filters are hubble observe's: different filters must all hold, a filter "
        "given twice holds if either value does. A pod is namespace/name, or a name in any namespace.",
    )
    monitor.add_argument(
        "-t", "--type", action="append", choices=("all", *EVENT_TYPES), help="only events of this type (repeatable)"
    )
    monitor.add_argument("--from-pod", "--from", action="append", help="only events from this pod")
    monitor.add_argument("--to-pod", "--to", action="append", help="only events to this pod")
    monitor.add_argument("--pod", action="append", help="only events from or to this pod")
    monitor.add_argument("-n", "--namespace", action="append", help="only events from or to a pod of this namespace")
    monitor.add_argument(
        "--verdict", action="append", type=str.upper, choices=VERDICTS,
        help="only events with this verdict: FORWARDED, DROPPED (a kernel drop or an L7 denial), REDIRECTED "
        "(to the proxy), AUDIT, ERROR",
    )  # fmt: skip
    monitor.add_argument("--http-status", action="append", help="only requests answered so: a code (403) or 4+")
    monitor.add_argument(
        "--last", type=positive_int, metavar="N", help="the last N recorded events (the agent keeps 4,095)"
    )
    monitor.add_argument("-f", "--follow", action="store_true", help="with --last: then follow on")
    add_output_option(monitor, ("text", "json"))
    monitor.add_argument("-j", "--json", dest="output", action="store_const", const="json", help="-o json")
    monitor.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour verdicts (auto: on a terminal)"
    )
    monitor.set_defaults(handler=_monitor)
