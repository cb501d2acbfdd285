"""Audit mode in the lab (issue 17): a policy with `policy.sidecarless.io/audit: "true"` changes no verdict; the
kernel (new flows) and Envoy (requests, RBAC shadow rules) report where it would, naming the rule, and the
agent counts it. Removing the annotation enforces it."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecarless.api.client import agent_get
from sidecarless.lab.node import Lab
from tests.e2e.conftest import BILLING, Monitor, billing, status_code, tcp_echo, wait_until, write_policy

EXAMPLE = (BILLING / "policies-with-5432" / "billing-api.yaml").read_text()
NAME = "{name: billing-api-l7-policy, namespace: production}"
AUDIT_ANNOTATION = 'annotations: {policy.sidecarless.io/audit: "true"}'
AUDITED_EXAMPLE = EXAMPLE.replace(NAME, NAME[:-1] + f", {AUDIT_ANNOTATION}}}")
# Would let through what the example denies: dev-tool to the database, and prometheus posting to /x.
LOOSENING = f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: loosen, namespace: production, {AUDIT_ANNOTATION}}}
spec:
  endpointSelector: {{matchLabels: {{app: billing-api}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: dev-tool}}}}]
    toPorts: [{{ports: [{{port: "5432", protocol: TCP}}]}}]
  - fromEndpoints: [{{matchLabels: {{app: prometheus}}}}]
    toPorts:
    - ports: [{{port: "8080", protocol: TCP}}]
      rules: {{http: [{{method: POST, path: /x}}]}}
"""
RULE = "production/billing-api-l7-policy spec.ingress[{}]"
DEFAULT_DENY = "default deny of ingress of production/billing-api (selected by production/billing-api-l7-policy)"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with billing("audit", "policies-with-5432") as lab:
        yield lab


def audit_events(monitor: Monitor) -> list[dict[str, object]]:
    return [event for _, event in monitor.events if event["type"] == "audit"]


def summary(event: dict[str, object]) -> tuple[object, ...]:
    source, destination = event["source"], event["destination"]
    assert isinstance(source, dict) and isinstance(destination, dict)
    return (source["name"], destination["port"], event["method"], event["path"], event["verdict"], event["audit"],
            event["rule"])  # fmt: skip


def audit_counts(lab: Lab) -> dict[tuple[str, str, str], float]:
    status, body = agent_get(lab.agent_socket, "/metrics")
    assert status == 200
    return {
        (sample.labels["layer"], sample.labels["enforced"], sample.labels["audit"]): sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "sidecarless_audit_events"
        for sample in family.samples
        if sample.name == "sidecarless_audit_events_total"
    }


def test_an_audited_policy_changes_no_verdict_reports_what_it_would_and_is_enforced_once_the_annotation_goes(
    lab: Lab, tmp_path: Path
) -> None:
    """billing-api selected by nothing enforced; the example policy in audit mode would deny POST /x, and
    dev-tool's flows at all."""
    assert lab.apply(write_policy(tmp_path / "audit", "billing-api.yaml", AUDITED_EXAMPLE).parent) == []
    monitor = Monitor(lab)
    monitor.wait_live(lab)
    assert status_code(lab, "prometheus", "POST", "/x") == "200"
    assert status_code(lab, "prometheus", "GET", "/metrics") == "200"  # the same under both: no event
    assert status_code(lab, "finance-batch", "GET", "/metrics") == "200"
    assert status_code(lab, "dev-tool", "GET", "/metrics") == "200"
    assert tcp_echo(lab, "dev-tool", 5432)
    wait_until(lambda: len(audit_events(monitor)) >= 4, "the audit events", timeout_s=10.0)
    monitor.stop()
    assert sorted(map(summary, audit_events(monitor))) == [
        ("production/dev-tool", 5432, "", "", "allow", "drop (Policy denied)", DEFAULT_DENY),
        ("production/dev-tool", 8080, "", "", "allow", "drop (Policy denied)", DEFAULT_DENY),
        ("production/finance-batch", 8080, "GET", "/metrics", "Forwarded", "Denied", RULE.format(1)),
        ("production/prometheus", 8080, "POST", "/x", "Forwarded", "Denied", RULE.format(0)),
    ]
    counts = audit_counts(lab)
    assert counts[("l7", "Forwarded", "Denied")] == 2
    assert counts[("l3l4", "allow", "drop (Policy denied)")] == 2

    # The annotation removed: enforced, and nothing to audit.
    assert lab.apply(write_policy(tmp_path / "enforced", "billing-api.yaml", EXAMPLE).parent) == []
    monitor = Monitor(lab)
    monitor.wait_live(lab)
    assert status_code(lab, "prometheus", "POST", "/x") == "403"
    assert status_code(lab, "dev-tool", "GET", "/metrics") == "dropped"
    assert not tcp_echo(lab, "dev-tool", 5432)
    wait_until(
        lambda: sum(e["type"] in ("drop", "l7") for _, e in monitor.events) >= 3, "the drops and the denial", 10.0
    )
    monitor.stop()
    assert audit_events(monitor) == []
    assert audit_counts(lab) == counts


def test_an_audited_loosening_reports_what_it_would_let_through_at_l4_and_l7(lab: Lab, tmp_path: Path) -> None:
    directory = tmp_path / "loosen"
    write_policy(directory, "billing-api.yaml", EXAMPLE)
    assert lab.apply(write_policy(directory, "loosen.yaml", LOOSENING).parent) == []
    monitor = Monitor(lab)
    monitor.wait_live(lab)
    assert not tcp_echo(lab, "dev-tool", 5432)
    assert status_code(lab, "prometheus", "POST", "/x") == "403"
    assert status_code(lab, "prometheus", "POST", "/y") == "403"  # denied under both: no event
    assert status_code(lab, "prometheus", "GET", "/metrics") == "200"
    wait_until(lambda: len(audit_events(monitor)) >= 2, "the audit events", timeout_s=10.0)
    wait_until(lambda: sum(e["type"] == "l7" for _, e in monitor.events) >= 3, "the L7 events", timeout_s=10.0)
    monitor.stop()
    (database, post) = sorted(set(map(summary, audit_events(monitor))))
    # The SYN is retransmitted while nc waits: one event per new flow the kernel decides, each the same.
    assert database == (
        "production/dev-tool",
        5432,
        "",
        "",
        "drop (Policy denied)",
        "allow",
        "production/loosen spec.ingress[0]",
    )
    # The rule items whose HTTP rules the audit verdict ORs on this port (the matching one among them).
    rules = f"{RULE.format(0)}, production/loosen spec.ingress[1]"
    assert post == ("production/prometheus", 8080, "POST", "/x", "Denied", "Forwarded", rules)
    lab.apply(BILLING / "policies-with-5432")
