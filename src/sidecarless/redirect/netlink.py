"""Netlink in the agent's (the node's) network namespace, through pyroute2: TC attach and proxy routing.

The only module that imports pyroute2.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Collection, Iterable, Mapping

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import popns, pushns

from sidecarless.redirect.maps import MARK_MASK, MARK_TO_PROXY

PROXY_ROUTE_TABLE = 2004
MAIN_ROUTE_TABLE = 254
PROXY_RULE_PRIORITY = 9
# A fixed priority and handle make "replace" swap the program in place, atomically; without them every
# call would add another filter (DATAPATH.md).
FILTER_PRIORITY = 1
FILTER_HANDLE = 1
ETH_P_ALL = 0x0003
# clsact's hooks: ingress sees what the interface receives (from the pod), egress what it sends (to the pod).
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"


class InterfaceMissing(Exception):
    """The pod's interface is not (yet) there; retry once the endpoint source catches up."""


def interface_index(name: str) -> int:
    """The index of `name` in this process's network namespace (one ioctl; pyroute2's link_lookup dumps every
    link, which made attaching to 200 pods' interfaces take 3 s)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise InterfaceMissing(name) from None


def attach(interfaces: Iterable[str], programs: Mapping[str, tuple[int, str]]) -> tuple[dict[str, int], list[str]]:
    """On each interface, each program (fd, name) at its TC hook (TC_INGRESS, TC_EGRESS), direct action,
    attached or atomically replaced, over one netlink socket. Returns (interface -> index of those done, those
    missing)."""
    done: dict[str, int] = {}
    missing: list[str] = []
    with IPRoute() as ipr:
        for interface in interfaces:
            try:
                index = interface_index(interface)
                _attach_one(ipr, index, programs)
            except InterfaceMissing:
                missing.append(interface)
            except NetlinkError as error:
                if error.code != errno.ENODEV:
                    raise
                missing.append(interface)  # gone between the lookup and the attach
            else:
                done[interface] = index
    return done, missing


def _attach_one(ipr: IPRoute, index: int, programs: Mapping[str, tuple[int, str]]) -> None:
    try:
        ipr.tc("add", "clsact", index)
    except NetlinkError as error:
        if error.code != errno.EEXIST:
            raise
    for hook, (program_fd, program_name) in programs.items():
        ipr.tc(
            "replace-filter",
            "bpf",
            index,
            handle=FILTER_HANDLE,
            fd=program_fd,
            name=program_name,
            parent=hook,
            classid=1,
            direct_action=True,
            prio=FILTER_PRIORITY,
            protocol=ETH_P_ALL,
        )


def attached_programs(interface: str, hook: str = TC_INGRESS) -> list[str]:
    """Names of the BPF programs at a TC hook of `interface`."""
    index = interface_index(interface)
    with IPRoute() as ipr:
        try:
            filters = ipr.get_filters(index=index, parent=int(hook.replace(":", ""), 16))
        except NetlinkError:
            return []
        names = []
        for message in filters:
            options = message.get_attr("TCA_OPTIONS")
            if options is not None and (name := options.get_attr("TCA_BPF_NAME")):
                names.append(str(name))
        return names


# Each family's "everything": the proxy table's local route.
ANY_ADDRESS = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


def ensure_proxy_routing(ipv6: bool = True) -> None:
    """Packets marked for the proxy are delivered locally (to the TPROXY socket), not forwarded: a rule and a
    local route for each family (IPv6 unless the node has it disabled)."""
    families = (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)
    with IPRoute() as ipr:
        loopback = interface_index("lo")
        for family in families:
            rules = ipr.get_rules(family=family, priority=PROXY_RULE_PRIORITY)
            if not any(rule.get_attr("FRA_TABLE") == PROXY_ROUTE_TABLE for rule in rules):
                ipr.rule(
                    "add",
                    family=family,
                    priority=PROXY_RULE_PRIORITY,
                    fwmark=MARK_TO_PROXY,
                    fwmask=MARK_MASK,
                    table=PROXY_ROUTE_TABLE,
                )
            ipr.route(
                "replace",
                family=family,
                dst=ANY_ADDRESS[family],
                type="local",
                scope="host",
                table=PROXY_ROUTE_TABLE,
                oif=loopback,
            )


def detach_all(program_names: tuple[str, ...]) -> list[str]:
    """Remove our programs from every interface of this namespace; the interfaces they were on."""
    detached = []
    with IPRoute() as ipr:
        interfaces = [(int(link["index"]), str(link.get_attr("IFLA_IFNAME"))) for link in ipr.get_links()]
    for index, name in interfaces:
        for hook in (TC_INGRESS, TC_EGRESS):
            if not any(program in program_names for program in attached_programs(name, hook)):
                continue
            with IPRoute() as ipr:
                ipr.tc("del-filter", "bpf", index, handle=FILTER_HANDLE, parent=hook, prio=FILTER_PRIORITY,
                       protocol=ETH_P_ALL)  # fmt: skip
            detached.append(f"{name} {'ingress' if hook == TC_INGRESS else 'egress'}")
    return detached


def remove_proxy_routing() -> None:
    with IPRoute() as ipr:
        for family in ANY_ADDRESS:
            for rule in ipr.get_rules(family=family):
                if rule.get_attr("FRA_TABLE") == PROXY_ROUTE_TABLE:
                    ipr.rule("del", family=family, priority=rule.get_attr("FRA_PRIORITY"),
                             table=PROXY_ROUTE_TABLE, fwmark=MARK_TO_PROXY, fwmask=MARK_MASK)  # fmt: skip
            # The table is the proxy's alone. (A "del" of the default route by its prefix matched nothing.)
            try:
                ipr.flush_routes(family=family, table=PROXY_ROUTE_TABLE)
            except NetlinkError as error:
                if error.code != errno.EAFNOSUPPORT:
                    raise


def route_interfaces(ips: Collection[str]) -> dict[str, str]:
    """For each address the node has a /32 (IPv6: /128) route to, the route's interface: how CNIs in the routed model
    (Calico, Cilium's own veths, the lab) wire a pod. An address without such a route is left out (not wired
    yet); a broader route (the default route, a pod CIDR on a bridge) says nothing about which veth is whose."""
    wanted = set(ips)
    found: dict[str, str] = {}
    with IPRoute() as ipr:
        names = {link["index"]: str(link.get("ifname")) for link in ipr.get_links()}
        for family, host_length in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
            for route in ipr.get_routes(family=family):
                destination, interface = route.get("dst"), names.get(route.get("oif"))
                main_host_route = route.get("table") == MAIN_ROUTE_TABLE and route["dst_len"] == host_length
                if main_host_route and destination in wanted and interface is not None:
                    found[destination] = interface
    return found


def tcp_listener_in_netns(netns: str, host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket in a named network namespace (the calling thread enters it for the bind only):
    how the lab serves its fake Kubernetes API to an agent in the node namespace from the test process."""
    pushns(netns)
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(64)
    finally:
        popns()
    return listener
