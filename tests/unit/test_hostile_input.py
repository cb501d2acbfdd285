"""Hostile but valid input is bounded (issue 12): YAML aliases refused, a policy set that would overflow a kernel
map rejected whole with an error that names the map, its size, the count, the pod and the policy."""

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sidecarless.lab.pods import NODE_IP, endpoints_of, parse_pods, place
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.identity import TooManyIdentities
from sidecarless.policy.model import CidrRule, Node
from sidecarless.policy.reader import PolicyFileError
from sidecarless.policy.schema import parse_policy_file
from sidecarless.redirect.maps import MapSizes, capacity_problems, render_maps
from tests.conftest import EXAMPLES
from tests.hostile_inputs import ALIAS_BOMB, many_prefixes, too_many_entries

BILLING_PODS = EXAMPLES / "billing-api" / "pods.yaml"
ENDPOINTS = endpoints_of(place(parse_pods("pods.yaml", BILLING_PODS.read_text())))


def test_an_alias_bomb_is_refused_at_once_naming_the_line() -> None:
    started = time.monotonic()
    with pytest.raises(PolicyFileError) as error:
        parse_policy_file("bomb.yaml", ALIAS_BOMB)
    assert time.monotonic() - started < 1.0
    assert [str(e) for e in error.value.errors] == [
        "bomb.yaml:7: invalid YAML: aliases expand to more values than the file has bytes"
    ]


def test_a_merge_key_bomb_is_refused_at_once() -> None:
    bomb = ALIAS_BOMB.replace("a: &a [", "a: &a {x: 1, y: 2, z: [").replace('"lol"]', '"lol"]}')
    for level in "bcdefg":
        previous = chr(ord(level) - 1)
        bomb = bomb.replace(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]",
                            f"{level}: &{level} {{<<: [" + ",".join([f"*{previous}"] * 9) + "]}")  # fmt: skip
    assert "<<: [*f" in bomb
    started = time.monotonic()
    with pytest.raises(PolicyFileError, match="merge keys \\(<<\\) are not accepted"):
        parse_policy_file("merge.yaml", bomb)
    assert time.monotonic() - started < 1.0


def test_anchors_and_aliases_within_reason_are_read_as_written() -> None:
    policy = many_prefixes(1).replace("path: /metrics", "path: /metrics/.*")
    aliased = policy.replace("{app: billing-api}}", "&selector {app: billing-api}}").replace(
        "[{matchLabels: {app: prometheus}}]", "[{matchLabels: *selector}]"
    )
    (plain,) = parse_policy_file("plain.yaml", policy.replace("{app: prometheus}", "{app: billing-api}")).policies
    (read,) = parse_policy_file("aliased.yaml", aliased).policies
    assert read.rules == plain.rules


def test_a_policy_set_that_overflows_the_policy_map_is_rejected_naming_map_pod_and_policy() -> None:
    (policy,) = parse_policy_file("too-big.yaml", too_many_entries()).policies
    plan = compile_plan([policy], ENDPOINTS, Node(ips=(NODE_IP,)))
    problems = capacity_problems(plan, MapSizes(), {policy.key: "too-big.yaml:1"})
    assert problems == [
        "map scl_policy holds 262,144 entries (--bpf-policy-map-max) and would need 302,400: pod "
        "production/billing-api needs 302,400, 302,400 of them for policy production/too-big (too-big.yaml:1)"
    ]
    # The count is what the kernel would hold.
    assert len(render_maps(plan, {"ingress": 15001, "egress": 15002}, frozenset()).policy) == 302_400
    # With a larger map it fits.
    assert capacity_problems(plan, MapSizes(policy=400_000), {}) == []


def test_the_ipcache_and_endpoint_maps_are_checked_too() -> None:
    (policy,) = parse_policy_file("many.yaml", many_prefixes(100)).policies
    plan = compile_plan([policy], ENDPOINTS, Node(ips=(NODE_IP,)))
    problems = capacity_problems(plan, MapSizes(endpoints=2, ipcache=50), {})
    assert (
        problems[0] == "map scl_endpoints holds 2 entries (--bpf-endpoints-map-max) and would need 8"
    )  # 4 pods, both families
    assert problems[1].startswith(
        "map scl_ipcache holds 50 entries (--bpf-ipcache-map-max) and would need 109"
    )  # 100 prefixes, 8 pod addresses, the node


def test_policy_validate_reports_the_overflow_offline_given_the_pods(tmp_path: Path) -> None:
    (tmp_path / "too-big.yaml").write_text(too_many_entries())
    command = [sys.executable, "-m", "sidecarless", "policy", "validate", "--pods", str(BILLING_PODS), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert "map scl_policy holds 262,144 entries (--bpf-policy-map-max) and would need 302,400" in result.stdout
    assert f"policy production/too-big ({tmp_path}/too-big.yaml:1)" in result.stdout
    bigger = [*command, "--bpf-policy-map-max", "400000"]
    assert subprocess.run(bigger, capture_output=True, text=True, timeout=60).returncode == 0


def test_policy_validate_refuses_the_alias_bomb_within_a_second(tmp_path: Path) -> None:
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    started = time.monotonic()
    command = [sys.executable, "-m", "sidecarless", "policy", "validate", str(tmp_path / "bomb.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and "aliases expand to more values" in result.stdout, result
    assert elapsed < 2.0, f"{elapsed:.2f} s, of which the interpreter's start is most"


def test_cidr_identities_carry_every_containing_prefix_and_addresses_exclude_the_ones_inside() -> None:
    text = many_prefixes(3).replace("    - 172.16.0.0/32\n", "    - 172.16.0.0/16\n    - 172.16.0.0/24\n")
    (policy,) = parse_policy_file("nested.yaml", text).policies
    plan = compile_plan([policy], ENDPOINTS, Node(ips=(NODE_IP,)))
    by_prefix = {identity.prefix: identity for identity in plan.identities if identity.prefix}
    labels = {prefix: sorted(label for label, _ in identity.labels) for prefix, identity in by_prefix.items()}
    assert labels["172.16.0.1/32"] == ["cidr:172.16.0.0/16", "cidr:172.16.0.0/24", "cidr:172.16.0.1/32",
                                       "reserved:world"]  # fmt: skip
    assert labels["172.16.0.0/16"] == ["cidr:172.16.0.0/16", "reserved:world"]
    wide = plan.address_set(by_prefix["172.16.0.0/16"].number)
    assert wide.include == ("172.16.0.0/16",)
    assert wide.exclude == ("172.16.0.0/24", "172.16.0.1/32", "172.16.0.2/32")


def test_more_prefixes_than_cidr_identities_is_an_error_not_an_endless_search() -> None:
    (parsed,) = parse_policy_file("p.yaml", too_many_entries()).policies
    prefixes = tuple(CidrRule(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}/32") for i in range(65_537))
    rule = parsed.rules[0]
    item = rule.ingress[0]  # type: ignore[index]
    wide = replace(parsed, rules=(replace(rule, ingress=(replace(item, peers=replace(item.peers, cidrs=prefixes)),)),))
    started = time.monotonic()
    with pytest.raises(TooManyIdentities, match="65,537 CIDR prefixes, more than the 65,536 CIDR identities"):
        compile_plan([wide], ENDPOINTS, Node(ips=(NODE_IP,)))
    assert time.monotonic() - started < 5
