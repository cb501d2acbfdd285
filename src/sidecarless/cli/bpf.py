"""`sidecarless bpf` and `sidecarless identity`: the kernel datapath through the agent (a pod's policy entries,
maps, tracked flows, the ipcache) and the identities its entries are keyed by, as cilium-dbg lists them."""

from __future__ import annotations

import argparse
from typing import Any

from sidecarless.cli.client import (
    Commands,
    UsageError,
    add_output_option,
    get_json,
    print_structured,
)

POLICY_COLUMNS = ["direction", "peer_identity", "peer_labels", "protocol", "ports", "action", "proxy_port"]


def show(rows: Any, output: str, columns: list[str], table_rows: list[dict[str, Any]] | None = None) -> None:
    """A listing: a table of `columns`, or everything the agent said with -o json|yaml."""
    from sidecarless.cli.views import table

    if output != "text":
        print_structured(rows, output)
    else:
        print(table(rows if table_rows is None else table_rows, columns))


def _bpf(args: argparse.Namespace) -> int:
    if args.bpf_command == "maps":
        maps = get_json(args, "/v1/bpf/maps")
        rows = [
            {"map": name, **fill, "pinned": f"{maps['pin_dir']}/{name}"} for name, fill in sorted(maps["maps"].items())
        ]
        show(maps, args.output, ["map", "entries", "max_entries", "pinned"], rows)
    elif args.bpf_command == "ct":
        columns = ["source", "destination", "protocol", "action", "flags", "revision", "expires_in_s"]
        show(get_json(args, "/v1/bpf/ct"), args.output, columns)
    elif args.bpf_command == "ipcache":
        show(get_json(args, "/v1/bpf/ipcache"), args.output, ["prefix", "identity", "labels", "pod"])
    else:
        _bpf_policy_get(args)
    return 0


def _bpf_policy_get(args: argparse.Namespace) -> None:
    """One pod's entries, or with --all every pod's of this node (`cilium-dbg bpf policy get --all`)."""
    from urllib.parse import quote

    if (args.pod is None) == (not args.all):
        raise UsageError("bpf policy get: name a pod, or --all")
    pods = [endpoint["pod"] for endpoint in get_json(args, "/v1/endpoints")] if args.all else [args.pod]
    entries = {pod: get_json(args, f"/v1/bpf/policy?pod={quote(pod)}") for pod in pods}
    if not args.all:
        show(entries[args.pod], args.output, POLICY_COLUMNS)
        return
    rows = [{"pod": pod, **entry} for pod, pod_entries in entries.items() for entry in pod_entries]
    show(entries, args.output, ["pod", *POLICY_COLUMNS], rows)


def _identity(args: argparse.Namespace) -> int:
    identities = get_json(args, "/v1/identities")
    rows = [
        {
            "id": identity["identity"],
            "kind": identity["kind"],
            "labels": ",".join(identity["labels"]),
            "pods and prefixes": ",".join(identity["holders"]) or "-",
        }
        for identity in identities
    ]
    show(identities, args.output, ["id", "kind", "labels", "pods and prefixes"], rows)
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    bpf = commands.add_parser("bpf", help="inspect the kernel datapath (through the agent)")
    bpf_commands = bpf.add_subparsers(dest="bpf_command", required=True)
    bpf_policy = bpf_commands.add_parser("policy", help="a pod's policy entries in the kernel")
    bpf_policy_commands = bpf_policy.add_subparsers(dest="bpf_policy_command", required=True)
    bpf_policy_get = bpf_policy_commands.add_parser("get", parents=[agent_client])
    bpf_policy_get.add_argument("pod", nargs="?", help="namespace/name or name")
    bpf_policy_get.add_argument("--all", action="store_true", help="every pod of this node")
    add_output_option(bpf_policy_get)
    bpf_maps = bpf_commands.add_parser("maps", parents=[agent_client], help="the pinned maps and their fill")
    add_output_option(bpf_maps)
    for name, what in (("ipcache", "the kernel's address -> identity cache"), ("ct", "the kernel's tracked flows")):
        listing = bpf_commands.add_parser(name, help=what)
        listing_commands = listing.add_subparsers(dest=f"bpf_{name}_command", required=True)
        add_output_option(listing_commands.add_parser("list", parents=[agent_client], help=what))
    bpf.set_defaults(handler=_bpf)

    identity = commands.add_parser("identity", help="the identities policy entries are keyed by")
    identity_commands = identity.add_subparsers(dest="identity_command", required=True)
    identity_list = identity_commands.add_parser(
        "list", parents=[agent_client], help="every identity: its labels, and the pods and prefixes that have it"
    )
    add_output_option(identity_list)
    identity.set_defaults(handler=_identity)
