"""`policy impact` (issue 17) in the pure core: recorded monitor events read back, decided under two policy
sets, the flips grouped; and the command's exit status."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecarless.observe.impact import PROXY, FlowsFileError, impact, path_pattern, read_flows
from sidecarless.policy.trace import Request
from tests.unit.test_policy_semantics import BILLING_HEAD, PODS, plan_of

BILLING, PROMETHEUS, FINANCE, DEV_TOOL = "10.244.1.10", "10.244.1.11", "10.244.1.12", "10.244.1.13"
GET_METRICS = (
    BILLING_HEAD
    + """  ingress:
  - fromEndpoints: [{matchLabels: {app: prometheus}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: /metrics}]}
"""
)
L4_ONLY = (
    BILLING_HEAD
    + """  ingress:
  - fromEndpoints: [{matchLabels: {app: prometheus}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: finance-batch}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""
)


def event(kind: str, source: str, destination: str, port: int, **fields: object) -> str:
    """A line as `monitor -o json` prints it."""
    peer = {"port": 40000, "identity": 0, "name": ""}
    return json.dumps(
        {
            "time": 0.0,
            "type": kind,
            "source": {**peer, "ip": source, "port": fields.pop("source_port", 40000)},
            "destination": {**peer, "ip": destination, "port": port},
            "protocol": fields.pop("protocol", "tcp"),
            "direction": "ingress",
            **fields,
        }
    )


RECORDED = [
    event("l7", PROMETHEUS, BILLING, 8080, verdict="Forwarded", method="GET", path="/metrics", status=200),
    event("l7", PROMETHEUS, BILLING, 8080, verdict="Forwarded", method="GET", path="/metrics", status=200),
    event("l7", PROMETHEUS, BILLING, 8080, verdict="Denied", method="POST", path="/orders/12345?x=1", status=403),
    event("l7", PROMETHEUS, BILLING, 8080, verdict="Denied", method="POST", path="/orders/67890", status=403),
    event("policy-verdict", PROMETHEUS, BILLING, 8080, verdict="redirect"),  # its requests are the l7 lines
    event("drop", DEV_TOOL, BILLING, 8080, reason="Policy denied", tcp_flags="SYN"),
    event("drop", DEV_TOOL, BILLING, 8080, reason="Policy denied", tcp_flags="SYN"),  # the retransmission
    event("drop", DEV_TOOL, BILLING, 8080, reason="Invalid source ip"),  # not a policy verdict
    event("drop", BILLING, DEV_TOOL, 40000, reason="Policy denied", tcp_flags="ACK|FIN"),  # decided again
    event("l7", PROMETHEUS, BILLING, 8080, verdict="Error", method="GET", path="/", status=503),
    json.dumps({"type": "agent", "source": {"ip": "", "port": 0}, "destination": {"ip": "", "port": 0}}),
    "",
]


def test_monitor_lines_are_read_back_as_flows_and_requests() -> None:
    records = read_flows("flows.jsonl", RECORDED)
    assert [(r.source, r.port, r.request) for r in records] == [
        (PROMETHEUS, 8080, Request("GET", "/metrics")),
        (PROMETHEUS, 8080, Request("GET", "/metrics")),
        (PROMETHEUS, 8080, Request("POST", "/orders/12345?x=1")),
        (PROMETHEUS, 8080, Request("POST", "/orders/67890")),
        (DEV_TOOL, 8080, None),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [("not json", "flows.jsonl:2: not a monitor event"), ('{"type": "l7"}', "flows.jsonl:2: not a monitor event")],
)
def test_a_line_that_is_not_a_monitor_event_is_an_error_naming_file_and_line(line: str, message: str) -> None:
    with pytest.raises(FlowsFileError, match=message):
        read_flows("flows.jsonl", [RECORDED[0], line])


def test_loosening_to_l3_l4_flips_the_denied_requests_and_nothing_else() -> None:
    records = read_flows("flows.jsonl", RECORDED)
    (flip,) = impact(plan_of(GET_METRICS), plan_of(L4_ONLY), records)
    assert (flip.source, flip.destination, flip.port, flip.method, flip.path) == (
        "production/prometheus", "production/billing-api", 8080, "POST", "/orders/*"
    )  # fmt: skip
    assert (flip.before, flip.after, flip.count) == ("denied", "allowed", 2)
    assert flip.before_rules == ("production/p spec.ingress[0]",)
    assert flip.after_rules == ("production/p spec.ingress[0]",)
    assert "2  production/prometheus -> production/billing-api:8080/tcp POST /orders/*: denied" in flip.text()


def test_tightening_flips_what_it_would_block_and_names_the_default_deny() -> None:
    records = read_flows("flows.jsonl", RECORDED)
    no_policy = plan_of()
    flips = impact(no_policy, plan_of(GET_METRICS), records)
    assert [(f.source, f.method, f.path, f.before, f.after, f.count) for f in flips] == [
        ("production/prometheus", "POST", "/orders/*", "allowed", "denied", 2),
        ("production/dev-tool", "", "", "allowed", "dropped", 1),
    ]
    assert flips[1].after_rules == ("default deny of ingress of production/billing-api",)
    assert flips[1].before_rules == ()
    # The same policies: nothing flips.
    assert impact(plan_of(GET_METRICS), plan_of(GET_METRICS), records) == []


def test_a_flow_recorded_without_its_requests_that_would_go_to_the_proxy_flips_to_proxy() -> None:
    records = read_flows("flows.jsonl", [event("policy-verdict", FINANCE, BILLING, 5432, verdict="allow")])
    to_l7 = L4_ONLY.replace('toPorts: [{ports: [{port: "5432", protocol: TCP}]}]', (
        'toPorts: [{ports: [{port: "5432", protocol: TCP}], rules: {http: [{method: GET}]}}]'
    ))  # fmt: skip
    (flip,) = impact(plan_of(L4_ONLY), plan_of(to_l7), records)
    assert (flip.before, flip.after, flip.after_rules) == ("allowed", PROXY, ("production/p spec.ingress[1]",))


def test_paths_group_by_pattern() -> None:
    assert path_pattern("/orders/12345/items?page=2") == "/orders/*/items"
    assert path_pattern("/u/3f2a9c1e-8b7d-4e6f-a5c4-0123456789ab") == "/u/*"
    assert path_pattern("/metrics") == "/metrics"


def test_the_command_exits_0_when_nothing_flips_1_when_something_does_2_on_bad_input(tmp_path: Path) -> None:
    pods = tmp_path / "pods.yaml"
    pods.write_text(PODS)
    current, proposed = tmp_path / "current", tmp_path / "proposed"
    for directory, text in ((current, GET_METRICS), (proposed, L4_ONLY)):
        directory.mkdir()
        (directory / "p.yaml").write_text(text)
    flows = tmp_path / "flows.jsonl"
    flows.write_text("\n".join(RECORDED) + "\n")

    def run(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "sidecarless", "policy", "impact", "--flows", str(flows), "--pods", str(pods)]
        return subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=60)

    same = run("--current", str(current), "--policies", str(current))
    assert same.returncode == 0, same.stderr
    assert "5 recorded flows and requests; 0 would be decided otherwise" in same.stdout
    changed = run("--current", str(current), "--policies", str(proposed), "-o", "json")
    assert changed.returncode == 1, changed.stderr
    (flip,) = json.loads(changed.stdout)["flips"]
    assert (flip["from"], flip["before"], flip["after"], flip["count"]) == (
        "production/prometheus",
        "denied",
        "allowed",
        2,
    )
    missing = run("--policies", str(proposed))
    assert missing.returncode == 2 and "--current DIR is needed" in missing.stderr
    nobody = [sys.executable, "-m", "sidecarless", "policy", "impact", "--flows", str(flows), "--policies",
              str(proposed), "-H", str(tmp_path / "no-agent.sock")]  # fmt: skip
    unreachable = subprocess.run(nobody, capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 2 and "no agent answers" in unreachable.stderr
    flows.write_text("{}\n")
    broken = run("--current", str(current), "--policies", str(proposed))
    assert broken.returncode == 2 and f"{flows}:1: not a monitor event" in broken.stderr
