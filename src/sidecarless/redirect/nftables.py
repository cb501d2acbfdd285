"""The nftables TPROXY rules that deliver packets the TC program marked to Envoy's transparent listeners.

Applied with `nft -f -` as one transaction, in the agent's (the node's) network namespace; the table is
owned by sidecarless and replaced whole. One rule per proxy port: the mark carries the port in its upper
16 bits. The table is of family inet: each rule holds for IPv4 and IPv6 alike (DATAPATH.md).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

from sidecarless.redirect.maps import MARK_MASK, MARK_TO_PROXY

TABLE = "sidecarless"


def ruleset(proxy_ports: Iterable[int]) -> str:
    ports = sorted(set(proxy_ports))
    # Nothing but a marked flow reaches the proxy ports: a pod connecting to the node's proxy port itself
    # would otherwise reach Envoy with no policy chain meant for it. Every packet the node forwards passes
    # this chain, so the cheap tests come first and the route lookup (fib) is made for proxy ports only.
    guard = (
        f"        tcp dport {{ {', '.join(map(str, ports))} }} meta mark & 0x{MARK_MASK:08x} != 0x{MARK_TO_PROXY:08x} "
        'iifname != "lo" fib daddr type local drop'
    )
    rules = "\n".join(
        f"        meta l4proto tcp meta mark & 0xffff{MARK_MASK:04x} == 0x{port << 16 | MARK_TO_PROXY:08x} "
        f"tproxy to :{port}"
        for port in ports
    )
    # The IPv4-only table of earlier versions goes in the same transaction (declared first, so the delete
    # cannot fail on a node that never had it).
    return f"""table ip {TABLE}
delete table ip {TABLE}
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
{guard}
{rules}
    }}
}}
"""


def apply_tproxy(proxy_ports: Iterable[int]) -> None:
    result = subprocess.run(["nft", "-f", "-"], input=ruleset(proxy_ports), text=True, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"nft failed: {result.stderr.strip()}")


def remove_tproxy() -> None:
    for family in ("inet", "ip"):
        subprocess.run(["nft", "delete", "table", family, TABLE], capture_output=True)
