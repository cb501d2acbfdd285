"""The nftables TPROXY rule that delivers packets the TC program marked to Envoy's transparent listener.

Applied with `nft -f -` as one transaction, in the agent's (the node's) network namespace; the table is
owned by sidecarless and replaced whole.
"""

from __future__ import annotations

import subprocess

from sidecarless.redirect.maps import MARK_MASK, MARK_TO_PROXY

TABLE = "sidecarless"


def ruleset(proxy_port: int) -> str:
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        meta l4proto tcp meta mark & 0x{MARK_MASK:08x} == 0x{MARK_TO_PROXY:08x} tproxy to :{proxy_port}
    }}
}}
"""


def apply_tproxy(proxy_port: int) -> None:
    result = subprocess.run(["nft", "-f", "-"], input=ruleset(proxy_port), text=True, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"nft failed: {result.stderr.strip()}")
