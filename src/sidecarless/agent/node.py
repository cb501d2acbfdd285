"""What the agent installs on the node (TPROXY rules, proxy routing, programs on interfaces), and
`sidecarless datapath uninstall`, which takes it all away.

Uninstall runs in the node's network namespace (on a node: the host's), with the agent stopped. The datapath
and Envoy outlive the agent on purpose; this is how an operator takes them away.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from sidecarless.envoy.process import stop_envoy
from sidecarless.redirect import netlink, nftables
from sidecarless.redirect.bpf import BpfDatapath, detach_socket_programs
from sidecarless.redirect.maps import PROGRAM_NAMES

NODE = "node"  # the owner of the node's own interfaces


def node_has_ipv6(proc_sys_net: Path) -> bool:
    """IPv6 is on in the node's network namespace (a node may boot with it disabled: then IPv4 alone)."""
    disabled = proc_sys_net / "ipv6/conf/all/disable_ipv6"
    return disabled.exists() and disabled.read_text().strip() == "0"


def prepare_node(proxy_ports: Iterable[int], proc_sys_net: Path, ipv6: bool) -> None:
    nftables.apply_tproxy(proxy_ports)
    netlink.ensure_proxy_routing(ipv6)
    # A TIME_WAIT socket of a proxied flow would otherwise be attached by early demux to a later direct
    # flow on the same tuple, which forwarding then drops (DATAPATH.md).
    (proc_sys_net / "ipv4/tcp_early_demux").write_text("0\n")
    # While one Envoy replaces another on the same ports, connections queued on the old one's listening
    # socket when it closes move to the new one's instead of being reset (LIFECYCLE.md; both families).
    (proc_sys_net / "ipv4/tcp_migrate_req").write_text("1\n")


def attach_programs(hooks: Iterable[tuple[str, str]], attached: dict[str, int], datapath: BpfDatapath) -> list[str]:
    """The programs on every (interface, owner) not yet in `attached`, both ways: from_pod decides what enters
    the node by it, to_pod records what the node itself sends out (so the replies are known). Atomic replace,
    so a restarted agent swaps in its programs without a moment unattached. Returns what is pending:
    interfaces not there yet."""
    owners = {interface: owner for interface, owner in hooks if interface not in attached}
    if not owners:
        return []
    programs = {netlink.TC_INGRESS: datapath.from_pod, netlink.TC_EGRESS: datapath.to_pod}
    done, missing = netlink.attach(owners, programs)
    attached.update(done)
    return [f"attach {interface} ({owners[interface]}): interface missing" for interface in missing]


def uninstall(run_dir: Path, pin_dir: str, sockmap_cgroup: str | None = None) -> list[str]:
    """What was removed, in order: programs first (traffic stops being redirected), then the proxy. A wrong
    `sockmap_cgroup` stops it before anything is removed."""
    done = detach_socket_programs(pin_dir, sockmap_cgroup) if sockmap_cgroup is not None else []
    done += [f"detached from {place}" for place in netlink.detach_all(PROGRAM_NAMES)]
    nftables.remove_tproxy()
    netlink.remove_proxy_routing()
    done.append("removed the TPROXY rules and the proxy routing table")
    if stop_envoy(run_dir):
        done.append("stopped Envoy")
    if Path(pin_dir).exists():
        shutil.rmtree(pin_dir)
        done.append(f"removed pinned maps {pin_dir}")
    return done
