"""Policy is family-independent (issue 14, the policy engine's part): the same policy gives the same verdict over
IPv4 and IPv6; IPv6 prefixes (with `except`) and the world of each family; a CIDR never selects a pod in either
family. Through the compiler and the offline verdict (`policy trace`); rendering for Envoy; what the kernel maps
hold until the datapath's IPv6 half lands."""

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from sidecarless.lab.scenario import Case, in_each_family
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.identity import WORLD_IDENTITY, WORLD_IPV6_IDENTITY
from sidecarless.policy.model import EGRESS, INGRESS, Endpoint, Node
from sidecarless.policy.plan import Plan, identity_of_address
from sidecarless.policy.reader import PolicyFileError
from sidecarless.policy.schema import parse_policy_file
from sidecarless.policy.trace import Request, trace
from sidecarless.redirect.maps import DEFAULT_MAP_SIZES, InterfaceValue, capacity_problems, render_maps
from sidecarless.xds.render import render
from sidecarless.xds.resources import LISTENER_TYPE

NODE = Node(ips=("10.244.0.1", "fd00:10:244::1"))


def pod(name: str, app: str, host: int, families: str = "dual") -> Endpoint:
    return Endpoint(
        name=name,
        namespace="shop",
        labels=(("app", app),),
        ip=f"10.244.1.{host}" if families != "ipv6" else "",
        ip6=f"fd00:10:244:1::{host:x}" if families != "ipv4" else "",
        interface=f"veth{host}",
    )


PODS = [pod("client", "client", 10), pod("server", "server", 11), pod("other", "other", 12),
        pod("v6only", "v6only", 13, "ipv6"), pod("v4only", "v4only", 14, "ipv4")]  # fmt: skip


def plan_of(text: str) -> Plan:
    documents = "\n---\n".join(textwrap.dedent(part) for part in text.split("---"))
    return compile_plan(parse_policy_file("p.yaml", documents).policies, PODS, NODE)


SERVER_POLICY = """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: server, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: server}}
      ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{method: GET, path: /items}]}}]
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
      ingressDeny:
        - fromEndpoints: [{matchLabels: {app: other}}]
"""


def verdict(
    plan: Plan, source: str, destination: str, port: int, family: int, **request: str
) -> tuple[str, int | None]:
    http = Request(request.get("method", "GET"), request.get("path", "/"), None, ()) if request else None
    result = trace(plan, source, destination, port, "TCP", http, family=family)
    return result.verdict, result.status


@pytest.mark.parametrize(
    ("source", "destination", "port", "request_"),
    [
        ("client", "server", 5432, {}),
        ("client", "server", 8080, {"method": "GET", "path": "/items"}),
        ("client", "server", 8080, {"method": "POST", "path": "/items"}),
        ("client", "server", 9999, {}),
        ("other", "server", 5432, {}),
        ("server", "client", 80, {}),
    ],
)
def test_the_same_policy_gives_the_same_verdict_in_both_families(
    source: str, destination: str, port: int, request_: dict[str, str]
) -> None:
    plan = plan_of(SERVER_POLICY)
    assert verdict(plan, source, destination, port, 4, **request_) == verdict(
        plan, source, destination, port, 6, **request_
    )


def test_the_flow_carries_the_family_asked_for() -> None:
    plan = plan_of(SERVER_POLICY)
    steps = trace(plan, "client", "server", 5432, family=6).steps
    assert steps and "client" in steps[0]
    # An IPv6-only pod has no IPv4 flow, and one flow has one family.
    with pytest.raises(ValueError, match="no IPv4 address"):
        trace(plan, "client", "v6only", 80, family=4)
    with pytest.raises(ValueError, match="one address family"):
        trace(plan, "10.244.1.10", "fd00:10:244:1::b", 80)
    # An address picks the family: the pod's IPv6 address is the pod.
    assert trace(plan, "fd00:10:244:1::a", "server", 5432).verdict == "allowed"
    assert trace(plan, "fd00:10:244:1::c", "server", 5432).verdict == "dropped"


EGRESS_CIDRS = """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: client}}
      egress:
        - toCIDRSet: [{cidr: 2001:db8::/32, except: ["2001:db8:1::/48"]}]
        - toCIDR: [198.51.100.0/24]
      egressDeny:
        - toCIDR: ["2001:db8:2::/48"]
"""


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("2001:db8::5", "allowed"),
        ("2001:db8:1::5", "dropped"),  # except
        ("2001:db8:2::5", "dropped"),  # deny wins
        ("2001:db9::1", "dropped"),  # outside
        ("198.51.100.7", "allowed"),
        ("203.0.113.1", "dropped"),
    ],
)
def test_ipv6_prefixes_with_except_and_deny(address: str, expected: str) -> None:
    assert trace(plan_of(EGRESS_CIDRS), "client", address, 443).verdict == expected


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("toCIDR: ['0.0.0.0/0']", {"198.51.100.7"}),
        ("toCIDR: ['::/0']", {"2001:db8::5"}),
        ("toEntities: [world]", {"198.51.100.7", "2001:db8::5"}),
        ("toEntities: [cluster]", set()),
    ],
)
def test_the_world_of_each_family(peer: str, allowed: set[str]) -> None:
    plan = plan_of(f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: client, namespace: shop}}
        spec:
          endpointSelector: {{matchLabels: {{app: client}}}}
          egress:
            - {peer}
    """)
    got = {
        address
        for address in ("198.51.100.7", "2001:db8::5")
        if trace(plan, "client", address, 443).verdict == "allowed"
    }
    assert got == allowed
    assert identity_of_address(plan, "198.51.100.7") == WORLD_IDENTITY
    assert identity_of_address(plan, "2001:db8::5") == WORLD_IPV6_IDENTITY


@pytest.mark.parametrize("prefix", ["10.244.0.0/16", "fd00:10:244::/48", "0.0.0.0/0", "::/0"])
def test_a_cidr_never_selects_a_pod_in_either_family(prefix: str) -> None:
    plan = plan_of(f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: server, namespace: shop}}
        spec:
          endpointSelector: {{matchLabels: {{app: server}}}}
          ingress:
            - fromCIDR: ["{prefix}"]
    """)
    for family in (4, 6):
        assert trace(plan, "client", "server", 80, family=family).verdict == "dropped"


def test_ipv6_cidrs_are_read_and_a_foreign_except_is_an_error() -> None:
    documents = parse_policy_file("p.yaml", textwrap.dedent(EGRESS_CIDRS))
    cidrs = documents.policies[0].rules[0].egress[0].peers.cidrs  # type: ignore[index]
    assert cidrs is not None and cidrs[0].cidr == "2001:db8::/32" and cidrs[0].excepts == ("2001:db8:1::/48",)
    with pytest.raises(PolicyFileError) as error:
        parse_policy_file("p.yaml", EGRESS_CIDRS.replace('"2001:db8:1::/48"', '"10.0.0.0/8"').replace("\n    ", "\n"))
    assert [str(e) for e in error.value.errors] == [
        "p.yaml:8: spec.egress[0].toCIDRSet[0].except[0]: 10.0.0.0/8 is not inside 2001:db8::/32"
    ]


def test_pods_and_the_node_are_in_the_ipcache_in_both_families() -> None:
    plan = plan_of(SERVER_POLICY)
    ipcache = dict(plan.ipcache)
    server = plan.endpoint("shop/server")
    assert server is not None
    assert ipcache["10.244.1.11/32"] == ipcache["fd00:10:244:1::b/128"] == server.identity
    assert ipcache["fd00:10:244::1/128"] == ipcache["10.244.0.1/32"] == 1  # the host
    assert plan.endpoint("fd00:10:244:1::d") is plan.endpoint("shop/v6only")


def test_the_kernel_maps_hold_both_families() -> None:
    """Every address of a pod is an endpoint entry with the same id; IPv6 prefixes are in the ipcache; a pod's
    veth knows its sources of each family (none: every source of that family is refused)."""
    plan = plan_of(EGRESS_CIDRS)
    entries = render_maps(plan, {INGRESS: 15001, EGRESS: 15002}, frozenset(), {"veth13": 13, "veth14": 14})
    assert entries.ipcache == dict(plan.ipcache) and any(":" in prefix for prefix in entries.ipcache)
    assert "" not in entries.endpoints and "10.244.1.14" in entries.endpoints
    assert "fd00:10:244:1::d" in entries.endpoints
    dual = plan.endpoint("shop/server")
    assert dual is not None and dual.endpoint.ip and dual.endpoint.ip6
    assert entries.endpoints[dual.endpoint.ip] == entries.endpoints[dual.endpoint.ip6]
    assert entries.interfaces[13] == InterfaceValue("", "fd00:10:244:1::d")
    assert entries.interfaces[14].ip4 == "10.244.1.14"
    assert capacity_problems(plan, DEFAULT_MAP_SIZES) == []


def test_envoy_chains_match_both_addresses_of_a_pod() -> None:
    resources = render(plan_of(SERVER_POLICY), {INGRESS: 15001, EGRESS: 15002})
    listener = resources.by_type[LISTENER_TYPE]["sidecarless/ingress"]
    ranges = {
        (cidr.address_prefix, cidr.prefix_len.value)
        for chain in listener.filter_chains  # type: ignore[attr-defined]
        for cidr in chain.filter_chain_match.prefix_ranges
    }
    assert ranges == {("10.244.1.11", 32), ("fd00:10:244:1::b", 128)}


LAB_PODS = """
ipFamily: {family}
pods:
  - {{name: client, namespace: shop, labels: {{app: client}}}}
  - {{name: server, namespace: shop, labels: {{app: server}}, serve: [{{port: 8080}}]}}
external:
  - {{name: v6-host, ip: "2001:db8::10"}}
"""


@pytest.mark.parametrize(
    ("family", "addresses"),
    [
        ("ipv4", [("10.244.1.10", ""), ("10.244.1.11", "")]),
        ("dual", [("10.244.1.10", "fd00:10:244:1::a"), ("10.244.1.11", "fd00:10:244:1::b")]),
        ("ipv6", [("", "fd00:10:244:1::a"), ("", "fd00:10:244:1::b")]),
    ],
)
def test_the_lab_gives_pods_the_addresses_of_their_family(family: str, addresses: list[tuple[str, str]]) -> None:
    from sidecarless.lab.pods import NODE_IP6, node_addresses, parse_pods, place

    placements = place(parse_pods("pods.yaml", LAB_PODS.format(family=family)))
    assert [(p.ip, p.ip6) for p in placements[:2]] == addresses
    assert (placements[2].ip, placements[2].ip6) == ("", "2001:db8::10")  # an external host keeps its own
    assert (NODE_IP6 in node_addresses(placements)) == (family != "ipv4")


def test_the_lab_pod_file_says_which_family_is_wrong() -> None:
    from sidecarless.lab.pods import PodsFileError, parse_pods

    with pytest.raises(PodsFileError, match=r"pods.yaml:2: ipFamily: must be one of ipv4, ipv6, dual, not 'ipv5'"):
        parse_pods("pods.yaml", LAB_PODS.format(family="ipv5"))
    with pytest.raises(PodsFileError, match=r"external\[0\].ip: must be outside the pod network fd00:10:244::/48"):
        parse_pods("pods.yaml", LAB_PODS.format(family="dual").replace("2001:db8::10", "fd00:10:244:1::99"))


def test_a_verdict_table_case_may_carry_its_family(tmp_path: Path) -> None:
    """`family: 6` runs the case over IPv6 (offline here: the same verdict as over IPv4)."""
    from sidecarless.lab.scenario import run_offline

    (tmp_path / "pods.yaml").write_text(LAB_PODS.format(family="dual"))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "server.yaml").write_text(textwrap.dedent(SERVER_POLICY))
    cases = [
        {"id": f"{name}-{family}", "from": source, "to": "server", "port": 8080, "path": "/items", "expect": expect,
         "family": family}
        for name, source, expect in (("client", "client", 200), ("outside", "v6-host", "dropped"))
        for family in (4, 6)
        if not (source == "v6-host" and family == 4)
    ]  # fmt: skip
    (tmp_path / "cases.yaml").write_text(json.dumps({"cases": cases}))
    outcomes = run_offline(tmp_path)
    assert [(o.case.id, o.observed, o.passed) for o in outcomes] == [
        ("client-4", "200", True),
        ("client-6", "200", True),
        ("outside-6", "dropped", True),
    ]


def test_a_case_runs_in_each_family_both_its_ends_have() -> None:
    families = {"client": {4, 6}, "server": {4, 6}, "v4host": {4}, "v6only": {6}}.__getitem__
    case = Case("c1", "client", "server", 8080, 200)
    assert [(c.id, c.family) for c in in_each_family(case, families)] == [("c1 (IPv4)", 4), ("c1 (IPv6)", 6)]
    assert in_each_family(replace(case, destination="v4host"), families) == [replace(case, destination="v4host")]
    assert in_each_family(replace(case, destination="v6only"), families) == [replace(case, destination="v6only")]
    assert in_each_family(replace(case, family=6), families) == [replace(case, family=6)]


def test_one_envoy_listener_takes_both_families() -> None:
    """[::] with ipv4_compat: IPv4 flows arrive as mapped addresses (Envoy matches them as plain IPv4)."""
    listener = render(plan_of(SERVER_POLICY), {INGRESS: 15001, EGRESS: 15002}).by_type[LISTENER_TYPE][
        "sidecarless/ingress"
    ]
    address = listener.address.socket_address  # type: ignore[attr-defined]
    assert (address.address, address.port_value, address.ipv4_compat) == ("::", 15001, True)
    ipv4_only = render(plan_of(SERVER_POLICY), {INGRESS: 15001, EGRESS: 15002}, listen_address="0.0.0.0")
    assert not ipv4_only.by_type[LISTENER_TYPE]["sidecarless/ingress"].address.socket_address.ipv4_compat  # type: ignore[attr-defined]
