"""`sidecarless policy validate`, `trace` and `impact`: policy files offline, no agent needed; `policy hits`: what
an agent counted per rule."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecarless.cli.client import (
    Commands,
    add_output_option,
    agent_socket,
    get_json,
    positive_int,
    print_structured,
)

if TYPE_CHECKING:
    from sidecarless.policy.model import Endpoint
    from sidecarless.policy.plan import Plan
    from sidecarless.policy.trace import Trace


def _policy_validate(args: argparse.Namespace) -> int:
    from sidecarless.policy.reader import PolicyFileError
    from sidecarless.sources.files import read_policy_file, validate_policies

    errors: list[str] = []
    count = 0
    for raw in args.paths:
        path = Path(raw)
        if path.is_dir():
            errors += validate_policies(path)
            count += 1
        elif path.is_file():
            count += 1
            try:
                read_policy_file(path, str(path))
            except PolicyFileError as error:
                errors += [str(item) for item in error.errors]
        else:
            errors.append(f"{path}: no such file or directory")
    if not errors and args.pods:
        errors += _capacity_errors(args)
    for line in errors:
        print(line)
    if not errors:
        print(f"{count} path(s) valid")
    return 1 if errors else 0


def _capacity_errors(args: argparse.Namespace) -> list[str]:
    """What the agent would say of these policies with these pods: the maps could not hold them."""
    from sidecarless.lab.pods import PodsFileError, endpoints_of, node_addresses, parse_pods, place
    from sidecarless.policy.compile import compile_plan
    from sidecarless.policy.identity import TooManyIdentities
    from sidecarless.policy.model import Node
    from sidecarless.redirect.maps import MapSizes, capacity_problems
    from sidecarless.sources.files import policy_files, read_policy_file

    try:
        pods = parse_pods(args.pods, Path(args.pods).read_text())
    except (PodsFileError, OSError) as error:
        return [str(error)]
    policies = []
    for raw in args.paths:
        path = Path(raw)
        for file in policy_files(path) if path.is_dir() else [path]:
            policies += list(read_policy_file(file, str(file)).policies)
    try:
        placements = place(pods)
        plan = compile_plan(policies, endpoints_of(placements), Node(ips=node_addresses(placements)))
    except TooManyIdentities as error:
        return [f"{args.pods}: {error}"]
    sizes = MapSizes(args.bpf_endpoints_map_max, args.bpf_ipcache_map_max, args.bpf_policy_map_max)
    locations = {policy.key: f"{policy.file}:{policy.line}" for policy in policies}
    return [f"{args.pods}: {problem}" for problem in capacity_problems(plan, sizes, locations)]


def _policy_trace(args: argparse.Namespace) -> int:
    from sidecarless.lab.pods import PodsFileError, endpoints_of, node_addresses, parse_pods, place
    from sidecarless.policy.compile import compile_plan
    from sidecarless.policy.model import Node, enforced_policies
    from sidecarless.policy.trace import Request, trace_with_audit
    from sidecarless.sources.files import PolicyDirectory, validate_policies

    errors = validate_policies(Path(args.policies))
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    try:
        pods = parse_pods(args.pods, Path(args.pods).read_text())
    except PodsFileError as error:
        print(error, file=sys.stderr)
        return 1
    placements = place(pods)
    policy_set = PolicyDirectory(Path(args.policies)).read_if_changed()
    assert policy_set is not None
    node = Node(ips=node_addresses(placements))
    policies, endpoints = policy_set.policies, endpoints_of(placements)
    plan = compile_plan(enforced_policies(policies), endpoints, node, policy_set.secrets, policies)
    audited = any(policy.audit for policy in policies)
    audit_plan = compile_plan(policies, endpoints, node, policy_set.secrets) if audited else None
    addresses = {p.pod.name: p.pod.external_ip for p in placements if p.pod.external_ip is not None}
    http = args.proto is None or args.method is not None or args.path is not None
    request = None
    if http:
        headers = tuple((name.strip(), value.strip()) for name, _, value in (h.partition(":") for h in args.header))
        request = Request(args.method or "GET", args.path or "/", args.http_host, headers)
    try:
        result = trace_with_audit(
            plan,
            audit_plan,
            addresses.get(args.source, args.source),
            addresses.get(args.destination, args.destination),
            args.port,
            (args.proto or "tcp").upper(),
            request,
            family=args.family,
        )
    except ValueError as error:
        print(f"policy trace: {error}", file=sys.stderr)
        return 2
    if args.output != "text":
        print_structured(result.as_dict(), args.output)
        return 0
    print(f"verdict: {_verdict_line(result)}")
    for step in result.steps:
        print(f"  {step}")
    if result.audit is not None:
        change = "would change it" if result.audit_differs else "the same"
        print(f"audit (every policy, audited ones included; not enforced): {_verdict_line(result.audit)}: {change}")
        for step in result.audit.steps:
            print(f"  {step}")
    return 0


def _policy_impact(args: argparse.Namespace) -> int:
    """Exit status: 0 nothing flips, 1 something does, 2 the input is wrong. Offline with --pods and --current;
    else the agent (-H, --lab) decides with the policies and pods it has."""
    try:
        result = _impact_offline(args) if args.pods else _impact_from_agent(args)
    except (OSError, ValueError) as error:
        print(f"policy impact: {error}", file=sys.stderr)
        return 2
    flips = result["flips"]
    if args.output != "text":
        print_structured(result, args.output)
    else:
        from sidecarless.observe.impact import Flip

        flipped = sum(flip["count"] for flip in flips)
        print(f"{result['records']} recorded flows and requests; {flipped} would be decided otherwise")
        for flip in flips:
            print(Flip.from_dict(flip).text())
    return 1 if flips else 0


def _impact_from_agent(args: argparse.Namespace) -> dict[str, Any]:
    from sidecarless.api.client import AgentUnreachable, agent_post
    from sidecarless.sources.files import policy_files

    directory = Path(args.policies)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    policies = {str(path): path.read_text(encoding="utf-8") for path in policy_files(directory)}
    flows = Path(args.flows).read_text(encoding="utf-8")
    try:
        status, body = agent_post(
            agent_socket(args), "/v1/policy/impact", 120.0, {"flows": flows, "policies": policies}
        )
    except AgentUnreachable as error:
        raise ValueError(f"no agent answers: {error}") from None
    if status != 200:
        raise ValueError(body.strip().replace("flows:", f"{args.flows}:"))
    result: dict[str, Any] = json.loads(body)
    return result


def _impact_offline(args: argparse.Namespace) -> dict[str, Any]:
    from sidecarless.lab.pods import endpoints_of, node_addresses, parse_pods, place
    from sidecarless.observe.impact import impact, read_flows

    if not args.current:
        raise ValueError("--current DIR is needed with --pods: the policies in force")
    placements = place(parse_pods(args.pods, Path(args.pods).read_text()))
    endpoints, node_ips = endpoints_of(placements), node_addresses(placements)
    with open(args.flows, encoding="utf-8") as flows_file:
        records = read_flows(args.flows, flows_file)
    current = _enforced_plan(Path(args.current), endpoints, node_ips)
    proposed = _enforced_plan(Path(args.policies), endpoints, node_ips)
    flips = impact(current, proposed, records, node_ips)
    return {"records": len(records), "flips": [flip.as_dict() for flip in flips]}


def _enforced_plan(policies_dir: Path, endpoints: list[Endpoint], node_ips: tuple[str, ...]) -> Plan:
    from sidecarless.policy.compile import compile_plan
    from sidecarless.policy.model import Node, enforced_policies
    from sidecarless.sources.files import PolicyDirectory, validate_policies

    errors = validate_policies(policies_dir)
    if errors:
        raise ValueError("\n".join(errors))
    policy_set = PolicyDirectory(policies_dir).read_if_changed()
    assert policy_set is not None
    every = policy_set.policies
    return compile_plan(enforced_policies(every), endpoints, Node(ips=node_ips), policy_set.secrets, every)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """90s, 30m, 2h, 7d."""
    unit = DURATION_UNITS.get(text[-1:])
    try:
        if unit is None or float(text[:-1]) < 0:
            raise ValueError
        return float(text[:-1]) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration like 90s, 30m, 2h or 7d") from None


def _policy_hits(args: argparse.Namespace) -> int:
    import time

    hits = get_json(args, "/v1/policy/hits")
    rules = hits["rules"]
    if args.unused:
        since = time.time() - args.since if args.since is not None else hits["since"]
        rules = [rule for rule in rules if rule["last_hit"] is None or rule["last_hit"] < since]
    if args.output != "text":
        print_structured({"since": hits["since"], "rules": rules}, args.output)
        return 0
    print(f"{'POLICY':<32} {'RULE':<52} {'FLOWS':>7} {'DENIED':>7} {'REQUESTS':>9} {'DENIED':>7}  LAST HIT")
    for rule in rules:
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rule["last_hit"])) if rule["last_hit"] else "-"
        name = f"{rule['policy']}{' (audit)' if rule['audit'] else ''}"
        print(
            f"{name:<32} {rule['rule']:<52} {rule['flows_allowed']:>7} {rule['flows_denied']:>7} "
            f"{rule['requests_allowed']:>9} {rule['requests_denied']:>7}  {last}"
        )
    return 0


def _verdict_line(result: Trace) -> str:
    status = f" (HTTP {result.status})" if result.status else ""
    proxy = f" through the proxy ({' + '.join(result.proxied)})" if result.proxied else " in the kernel"
    reason = f": {result.reason}" if result.reason and result.verdict == "dropped" else ""
    return f"{result.verdict}{status}{proxy if result.verdict != 'dropped' else ''}{reason}"


def add_commands(commands: Commands, agent_client: argparse.ArgumentParser) -> None:
    from sidecarless.redirect.maps import MapSizes

    sizes = MapSizes()
    policy = commands.add_parser("policy", help="policy files offline (validate, trace, impact); hits per rule")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    validate = policy_commands.add_parser("validate", help="check files or directories; every error as file:line")
    validate.add_argument("paths", nargs="+")
    validate.add_argument(
        "--pods", help="a lab pod file: also compile for these pods and check that the kernel maps can hold it"
    )
    validate.add_argument("--bpf-policy-map-max", type=positive_int, default=sizes.policy)
    validate.add_argument("--bpf-ipcache-map-max", type=positive_int, default=sizes.ipcache)
    validate.add_argument("--bpf-endpoints-map-max", type=positive_int, default=sizes.endpoints)
    validate.set_defaults(handler=_policy_validate)
    trace = policy_commands.add_parser("trace", help="the verdict for one flow or request, offline")
    trace.add_argument("--pods", required=True, help="the lab's pod file")
    trace.add_argument("--policies", required=True)
    trace.add_argument("--from", dest="source", required=True, help="pod, external host or address")
    trace.add_argument("--to", dest="destination", required=True, help="pod, external host or address")
    trace.add_argument("--port", type=int, required=True)
    trace.add_argument("--proto", choices=("tcp", "udp"), help="a plain TCP/UDP exchange instead of HTTP")
    trace.add_argument("--method")
    trace.add_argument("--path")
    trace.add_argument("--host", dest="http_host", help="Host header (default: destination:port)")
    trace.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    add_output_option(trace)
    family = trace.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=4, help="the flow over IPv4 (as curl -4)")
    family.add_argument("-6", dest="family", action="store_const", const=6, help="the flow over IPv6 (as curl -6)")
    trace.set_defaults(handler=_policy_trace)
    impact = policy_commands.add_parser(
        "impact",
        parents=[agent_client],
        help="what recorded traffic (monitor -o json) would get under other policies: the flips, grouped",
        description="Exit status 0: nothing flips; 1: something does; 2: bad input.",
    )
    impact.add_argument("--flows", required=True, help="what `monitor -o json` printed, one event per line")
    impact.add_argument("--policies", required=True, help="the proposed policy directory")
    impact.add_argument("--pods", help="offline: a lab pod file, with --current (default: ask the agent, -H/--lab)")
    impact.add_argument("--current", help="with --pods: the policy directory in force")
    add_output_option(impact)
    impact.set_defaults(handler=_policy_impact)
    hits = policy_commands.add_parser(
        "hits",
        parents=[agent_client],
        help="per rule of every policy: the flows and requests it allowed and denied, and when it last did",
    )
    hits.add_argument("--unused", action="store_true", help="only the rules nothing hit (since --since)")
    hits.add_argument("--since", type=duration_s, help="with --unused: this long ago (90s, 30m, 2h, 7d)")
    add_output_option(hits)
    hits.set_defaults(handler=_policy_hits)
