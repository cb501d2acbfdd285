"""`sidecarless bpf`: the kernel datapath through the agent (a pod's policy entries, maps, tracked flows)."""

from __future__ import annotations

import argparse
import json

from sidecarless.cli.client import (
    Commands,
    get_json,
)


def _bpf(args: argparse.Namespace) -> int:
    from sidecarless.cli.views import table

    if args.bpf_command == "maps":
        maps = get_json(args, "/v1/bpf/maps")
        if args.output == "json":
            print(json.dumps(maps, indent=2))
        else:
            rows = [
                {"map": name, **fill, "pinned": f"{maps['pin_dir']}/{name}"}
                for name, fill in sorted(maps["maps"].items())
            ]
            print(table(rows, ["map", "entries", "max_entries", "pinned"]))
        return 0
    if args.bpf_command == "ct":
        flows = get_json(args, "/v1/bpf/ct")
        if args.output == "json":
            print(json.dumps(flows, indent=2))
        else:
            print(table(flows, ["source", "destination", "protocol", "action", "flags", "revision", "expires_in_s"]))
        return 0
    if args.bpf_command == "ipcache":
        cache = get_json(args, "/v1/bpf/ipcache")
        if args.output == "json":
            print(json.dumps(cache, indent=2))
        else:
            print(table(cache, ["prefix", "identity", "labels", "pod"]))
        return 0
    from urllib.parse import quote

    entries = get_json(args, f"/v1/bpf/policy?pod={quote(args.pod)}")
    if args.output == "json":
        print(json.dumps(entries, indent=2))
    else:
        print(
            table(entries, ["direction", "peer_identity", "peer_labels", "protocol", "ports", "action", "proxy_port"])
        )
    return 0


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    bpf = commands.add_parser("bpf", help="inspect the kernel datapath (through the agent)")
    bpf_commands = bpf.add_subparsers(dest="bpf_command", required=True)
    bpf_policy = bpf_commands.add_parser("policy", help="a pod's policy entries in the kernel")
    bpf_policy_commands = bpf_policy.add_subparsers(dest="bpf_policy_command", required=True)
    bpf_policy_get = bpf_policy_commands.add_parser("get", parents=[agent_client])
    bpf_policy_get.add_argument("pod")
    bpf_policy_get.add_argument("-o", "--output", choices=("text", "json"), default="text")
    bpf_maps = bpf_commands.add_parser("maps", parents=[agent_client], help="the pinned maps and their fill")
    bpf_maps.add_argument("-o", "--output", choices=("text", "json"), default="text")
    bpf_ipcache = bpf_commands.add_parser("ipcache", help="the kernel's address -> identity cache")
    bpf_ipcache_commands = bpf_ipcache.add_subparsers(dest="bpf_ipcache_command", required=True)
    bpf_ipcache_list = bpf_ipcache_commands.add_parser("list", parents=[agent_client])
    bpf_ipcache_list.add_argument("-o", "--output", choices=("text", "json"), default="text")
    bpf_ct = bpf_commands.add_parser("ct", help="the kernel's tracked flows")
    bpf_ct_commands = bpf_ct.add_subparsers(dest="bpf_ct_command", required=True)
    bpf_ct_list = bpf_ct_commands.add_parser("list", parents=[agent_client])
    bpf_ct_list.add_argument("-o", "--output", choices=("text", "json"), default="text")
    bpf.set_defaults(handler=_bpf)
