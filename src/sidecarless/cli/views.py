"""Readable views of what Envoy and the kernel hold, for `sidecarless envoy config rbac`, `bpf policy get` and
`status`. Pure: takes the JSON the agent API returns, returns text."""

from __future__ import annotations

from typing import Any

from sidecarless.observe.events import Event, hubble_verdict, pod_is

Json = dict[str, Any]


def rbac_text(route_dump: Json, pods_by_ip: dict[str, str]) -> str:
    """Envoy's RBAC policies, per pod and direction, as "who may send which requests on which ports"."""
    lines: list[str] = []
    for config in route_dump.get("configs", []):
        route_config = config.get("route_config", {})
        name = route_config.get("name", "?")
        for virtual_host in route_config.get("virtual_hosts", []):
            for route in virtual_host.get("routes", []):
                for filter_name, per_route in sorted(route.get("typed_per_filter_config", {}).items()):
                    policies = per_route.get("rbac", {}).get("rules", {}).get("policies", {})
                    if "rbac" not in filter_name:
                        continue
                    what = "egress rules" if "egress" in filter_name else "ingress rules"
                    lines.append(f"{name}  ({what})")
                    if not policies:
                        lines.append("  nothing allowed")
                    for policy_name in sorted(policies):
                        lines += _policy_lines(policies[policy_name], pods_by_ip)
    return "\n".join(lines) if lines else "no routes in Envoy"


def _policy_lines(policy: Json, pods_by_ip: dict[str, str]) -> list[str]:
    # A pod's two addresses are two principals with one name: named once.
    peers = ", ".join(dict.fromkeys(_principal(p, pods_by_ip) for p in policy.get("principals", [])))
    where, requests = _permission(policy.get("permissions", [{}])[0], pods_by_ip)
    place = f" {where}" if where else ""
    return [f"  from {peers}{place}: {request}" for request in requests]


def _principal(principal: Json, pods_by_ip: dict[str, str]) -> str:
    if principal.get("any"):
        return "any peer"
    if "direct_remote_ip" in principal:
        return _address(principal["direct_remote_ip"], pods_by_ip)
    if "or_ids" in principal:
        return " or ".join(_principal(p, pods_by_ip) for p in principal["or_ids"].get("ids", []))
    if "and_ids" in principal:
        return " and ".join(_principal(p, pods_by_ip) for p in principal["and_ids"].get("ids", []))
    if "not_id" in principal:
        return f"not ({_principal(principal['not_id'], pods_by_ip)})"
    return "?"


def _address(cidr: Json, pods_by_ip: dict[str, str]) -> str:
    address, length = cidr.get("address_prefix", "?"), int(cidr.get("prefix_len", 32))
    if length == (128 if ":" in address else 32) and address in pods_by_ip:
        return pods_by_ip[address]
    return f"{address}/{length}"


def _permission(permission: Json, pods_by_ip: dict[str, str]) -> tuple[str, list[str]]:
    """(where: destination and ports, the requests allowed there)."""
    if permission.get("any"):
        return "", ["any request"]
    where: list[str] = []
    requests = ["any request"]
    for rule in permission.get("and_rules", {}).get("rules", []):
        if "destination_port" in rule:
            where.append(f"port {rule['destination_port']}")
        elif "destination_port_range" in rule:
            ports = rule["destination_port_range"]
            where.append(f"ports {ports.get('start', 0)}-{int(ports.get('end', 0)) - 1}")
        elif "or_rules" in rule and any("destination_ip" in r for r in rule["or_rules"].get("rules", [])):
            where.append(
                "to " + " or ".join(_address(r["destination_ip"], pods_by_ip) for r in rule["or_rules"]["rules"])
            )
        elif "or_rules" in rule:
            requests = [_request(r) for r in rule["or_rules"].get("rules", [])]
        elif "not_rule" in rule:
            where.append("(elsewhere)")
    return " ".join(where), requests


def _request(rule: Json) -> str:
    if rule.get("any"):
        return "any request"
    conditions = rule.get("and_rules", {}).get("rules", [rule])
    method, path, rest = "*", "*", []
    for condition in conditions:
        header = condition.get("header")
        if header is not None:
            value = header.get("string_match", {}).get("safe_regex", {}).get("regex")
            exact = header.get("string_match", {}).get("exact")
            if header.get("name") == ":method":
                method = value or "*"
            elif header.get("name") == ":authority":
                rest.append(f"host {value}")
            elif header.get("present_match"):
                rest.append(f"header {header.get('name')}")
            else:
                rest.append(f"header {header.get('name')}: {exact if exact is not None else value}")
        elif "url_path" in condition:
            path = condition["url_path"].get("path", {}).get("safe_regex", {}).get("regex", "*")
    extra = f" ({', '.join(rest)})" if rest else ""
    return f"{method} {path}{extra}"


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) for c in columns}
    header = "  ".join(c.upper().ljust(widths[c]) for c in columns)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join([header, *body])


def status_text(status: Json, verbose: bool = False) -> str:
    envoy = status["envoy"]
    lines = [
        f"Agent:       {status['version']}, pid {status['pid']}, up {status['uptime_s']:.0f} s, "
        + ("ready" if status["ready"] else "NOT READY"),
    ]
    lines += [f"  pending:   {task}" for task in status["pending"]]
    lines.append(
        f"Envoy:       {envoy.get('version')}, pid {envoy.get('pid')}, restarts {envoy.get('restarts')}, "
        + ("connected" if envoy.get("connected") else "NOT CONNECTED")
        + (", adopted" if envoy.get("adopted") else "")
    )
    for type_name, xds in status["xds"].items():
        message = f": {xds['message']}" if xds.get("message") else ""
        lines.append(
            f"xDS {type_name + ':':<9} {xds['state']}, version {xds.get('accepted_version')}, "
            f"{len(xds.get('resources', []))} resource(s){message}"
        )
    policies = status["policies"]
    lines.append(f"Policies:    {policies['count']} in force, {len(policies['rejected'])} file(s) rejected")
    for file, errors in policies["rejected"].items():
        lines += [f"  {error}" for error in errors] if errors else [f"  {file}"]
    lines.append(f"Endpoints:   {len(status['endpoints'])}")
    maps = status["datapath"]["maps"]
    fill = ", ".join(f"{name} {m['entries']}/{m['max_entries']}" for name, m in sorted(maps.items()))
    lines.append(f"Datapath:    programs on {len(status['datapath']['programs'])} interface(s); maps {fill}")
    lines.append(f"Redirects:   {len(status['redirects'])}")
    if status.get("last_policy_to_enforced_s") is not None:
        lines.append(f"Last change: enforced {status['last_policy_to_enforced_s'] * 1000:.1f} ms after it was seen")
    if verbose:
        lines.append("")
        lines.append(
            table(status["endpoints"], ["pod", "ip", "interface", "identity", "ingress_enforced", "egress_enforced"])
        )
        if status["redirects"]:
            lines.append("")
            lines.append(table(status["redirects"], ["pod", "direction", "ports", "peer_identity", "listener"]))
        lines.append("")
        programs = [
            {"interface": name, "ingress": ",".join(p.get("ingress", [])), "egress": ",".join(p.get("egress", []))}
            for name, p in status["datapath"]["programs"].items()
        ]
        lines.append(table(programs, ["interface", "ingress", "egress"]))
    return "\n".join(lines)


def status_brief(status: Json) -> tuple[str, bool]:
    """`status --brief`: "OK", or what is wrong, in one line."""
    wrong = []
    if not status["ready"]:
        wrong.append("agent not ready" + (f" ({'; '.join(status['pending'])})" if status["pending"] else ""))
    if not status["envoy"].get("connected"):
        wrong.append("Envoy not connected")
    rejected = [name for name, xds in status["xds"].items() if xds["state"] == "NACKED"]
    if rejected:
        wrong.append(f"Envoy rejected {', '.join(rejected)}")
    return ("OK" if not wrong else "NOT OK: " + "; ".join(wrong)), not wrong


_VERDICT_COLOURS = {"DROPPED": 31, "FORWARDED": 32, "AUDIT": 33, "ERROR": 35, "REDIRECTED": 36}


def event_colour(event: Event, text: str) -> str:
    """A monitor line in its verdict's colour (red dropped, green forwarded, yellow audit, ...), for a terminal."""
    code = _VERDICT_COLOURS.get(hubble_verdict(event))
    return f"\033[{code}m{text}\033[0m" if code else text


def listener_rows(dump: Json, pod: str | None, port: int | None, name: str | None) -> tuple[Json, list[Json]]:
    """`envoy config listener`: the dump with only what the filters keep, and one row per filter chain (its
    listener, the pod whose chain it is, the addresses it matches)."""
    kept, rows = [], []
    for config in dump.get("configs", []):
        listener = config.get("active_state", {}).get("listener", {})
        address = listener.get("address", {}).get("socket_address", {})
        if (name is not None and listener.get("name") != name) or (
            port is not None and address.get("port_value") != port
        ):
            continue
        chains = [c for c in listener.get("filter_chains", []) if pod is None or pod_is(_chain_pod(c), pod)]
        if pod is not None and not chains:
            continue
        listener["filter_chains"] = chains
        kept.append(config)
        for chain in chains or [{}]:
            match = chain.get("filter_chain_match", {})
            prefixes = match.get("prefix_ranges") or match.get("source_prefix_ranges") or []
            side = "destination" if "prefix_ranges" in match else "source" if prefixes else ""
            rows.append(
                {
                    "listener": listener.get("name", "?"),
                    "address": f"{address.get('address', '?')}:{address.get('port_value', '?')}",
                    "chain": chain.get("name", "-"),
                    "match": f"{side} " + ", ".join(f"{p['address_prefix']}/{p.get('prefix_len', 0)}" for p in prefixes)
                    if prefixes
                    else "-",
                }
            )
    return {**dump, "configs": kept}, rows


def _chain_pod(chain: Json) -> str:
    """A filter chain's or route configuration's pod: `ingress/production/billing-api` -> production/billing-api."""
    return str(chain.get("name", "")).partition("/")[2]


def route_rows(dump: Json, pod: str | None, name: str | None) -> tuple[Json, list[Json]]:
    """`envoy config route` (and the dump `rbac` reads): route configurations by pod or name, one row each."""
    kept, rows = [], []
    for config in dump.get("configs", []):
        route_config = config.get("route_config", {})
        if (name is not None and route_config.get("name") != name) or (
            pod is not None and not pod_is(_chain_pod(route_config), pod)
        ):
            continue
        kept.append(config)
        hosts = route_config.get("virtual_hosts", [])
        routes = [route for host in hosts for route in host.get("routes", [])]
        filters = sorted({key for route in routes for key in route.get("typed_per_filter_config", {})})
        rows.append(
            {
                "name": route_config.get("name", "?"),
                "domains": ",".join(d for host in hosts for d in host.get("domains", [])),
                "routes": len(routes),
                "filters": ",".join(f.removeprefix("envoy.filters.http.") for f in filters) or "-",
            }
        )
    return {**dump, "configs": kept}, rows


def cluster_rows(dump: Json, name: str | None) -> tuple[Json, list[Json]]:
    kept = [c for c in dump.get("configs", []) if name is None or c.get("cluster", {}).get("name") == name]
    rows = [
        {
            "name": c.get("cluster", {}).get("name", "?"),
            "type": c.get("cluster", {}).get("type", "-"),
            "lb_policy": c.get("cluster", {}).get("lb_policy", "-"),
        }
        for c in kept
    ]
    return {**dump, "configs": kept}, rows
