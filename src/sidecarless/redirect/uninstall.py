"""`sidecarless datapath uninstall`: remove everything the agent installed on this node.

Run in the node's network namespace (on a node: the host's), with the agent stopped. The datapath and Envoy
outlive the agent on purpose; this is how an operator takes them away.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sidecarless.envoy.process import stop_envoy
from sidecarless.redirect import netlink, nftables

PROGRAMS = ("from_pod", "to_pod")


def uninstall(run_dir: Path, pin_dir: str) -> list[str]:
    """What was removed, in order: programs first (traffic stops being redirected), then the proxy."""
    done = [f"detached from {place}" for place in netlink.detach_all(PROGRAMS)]
    nftables.remove_tproxy()
    netlink.remove_proxy_routing()
    done.append("removed the TPROXY rules and the proxy routing table")
    if stop_envoy(run_dir):
        done.append("stopped Envoy")
    if Path(pin_dir).exists():
        shutil.rmtree(pin_dir)
        done.append(f"removed pinned maps {pin_dir}")
    return done
