"""Kubernetes mode in the lab: the agent takes its pods and policies from the fake API server (no real API
server can run here), through the real client code, and enforces them through the real kernel and Envoy."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sidecarless.api.client import agent_get, agent_status
from sidecarless.lab.fake_apiserver import FakeApiInThread, Object
from sidecarless.lab.node import Lab
from sidecarless.lab.scenario import run_scenario
from tests.e2e.conftest import BILLING, lab_name, status_code, wait_until

# The acceptance bound: a watch event changes verdicts in the lab within this long.
EVENT_TO_VERDICT_S = 1.0


def test_billing_api_table_from_the_fake_api_server() -> None:
    api = FakeApiInThread()
    lines: list[str] = []
    try:
        outcomes = run_scenario(
            BILLING, lab_name("k8s-table"), lines.append, prepare_agent=api.prepare_agent, apply=api.apply
        )
    finally:
        api.close()
    assert len(outcomes) == 44  # the table's 22 cases, over IPv4 and over IPv6
    assert all(outcome.passed for outcome in outcomes), "\n".join(lines)


@pytest.fixture(scope="module")
def k8s_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, FakeApiInThread]]:
    api = FakeApiInThread()
    lab = Lab(lab_name("k8s"))
    # The lab's own policy directory stays empty: whatever is enforced came from the API server.
    no_files = tmp_path_factory.mktemp("no-policy-files")
    try:
        lab.up(BILLING / "pods.yaml", no_files, prepare_agent=api.prepare_agent)
        assert status_code(lab, "prometheus", "POST", "/metrics") == "200"  # no policy selects billing-api yet
        api.apply(lab, BILLING / "policies")
        assert status_code(lab, "prometheus", "POST", "/metrics") == "403"
        yield lab, api
    finally:
        lab.down()
        api.close()


def extra_policy(path: str) -> Object:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "extra", "namespace": "production"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "billing-api"}},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": {"app": "prometheus"}}],
                    "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}], "rules": {"http": [{"path": path}]}}],
                }
            ],
        },
    }


def _seconds_until(lab: Lab, expected: dict[str, str], since: float) -> float:
    """Seconds from `since` until prometheus's GETs get the expected codes (path -> code); the requests answer
    at once (403 or 200), so polling them is fine-grained."""
    deadline = since + 5 * EVENT_TO_VERDICT_S
    while True:
        observed = {path: status_code(lab, "prometheus", "GET", path) for path in expected}
        if observed == expected:
            return time.monotonic() - since
        assert time.monotonic() < deadline, f"still {observed}, want {expected}"


def test_policy_added_changed_deleted_through_the_api_within_1s(k8s_lab: tuple[Lab, FakeApiInThread]) -> None:
    lab, api = k8s_lab
    assert agent_status(lab.agent_socket)["source"]["kind"] == "kubernetes"
    assert status_code(lab, "prometheus", "GET", "/healthz") == "403"
    steps: list[tuple[str, Callable[[], Any], dict[str, str]]] = [
        ("added", lambda: api.fake.put("ciliumnetworkpolicies", extra_policy("/healthz")),
         {"/healthz": "200", "/ready": "403", "/metrics": "200"}),
        ("changed", lambda: api.fake.put("ciliumnetworkpolicies", extra_policy("/ready")),
         {"/healthz": "403", "/ready": "200", "/metrics": "200"}),
        ("deleted", lambda: api.fake.delete("ciliumnetworkpolicies", "extra", "production"),
         {"/healthz": "403", "/ready": "403", "/metrics": "200"}),
    ]  # fmt: skip
    elapsed = {}
    for name, change, expected in steps:
        sent_before = api.call(lambda: api.fake.watch_events_sent)
        since = time.monotonic()  # just before the watch event: the measure errs long
        api.call(change)
        elapsed[name] = _seconds_until(lab, expected, since)
        assert api.call(lambda: api.fake.watch_events_sent) > sent_before
    print(f"watch event -> verdict changed in the lab: {elapsed}")
    assert all(seconds < EVENT_TO_VERDICT_S for seconds in elapsed.values()), elapsed


def test_pod_deleted_from_the_api_loses_its_access(k8s_lab: tuple[Lab, FakeApiInThread]) -> None:
    """A pod's identity follows the API: once prometheus's Pod object is gone its address is no pod's, the
    rule naming it no longer allows it (the kernel drops it), and it comes back with the object."""
    lab, api = k8s_lab
    pod = api.call(lambda: dict(api.fake.objects["pods"][("production", "prometheus")]))
    api.call(lambda: api.fake.delete("pods", "prometheus", "production"))
    try:
        wait_until(lambda: status_code(lab, "prometheus", "GET", "/metrics") == "dropped", "prometheus dropped")
    finally:
        api.call(lambda: api.fake.put("pods", pod))
    wait_until(lambda: status_code(lab, "prometheus", "GET", "/metrics") == "200", "prometheus allowed again")


def test_a_policy_sidecarless_cannot_honour_is_reported_and_the_rest_stays(
    k8s_lab: tuple[Lab, FakeApiInThread],
) -> None:
    """Accepted by the API server (the CRD keeps Cilium's other fields), rejected by sidecarless: its status on
    the object says why for this node, the agent's status and metric name it, and verdicts do not change."""
    lab, api = k8s_lab
    unsupported = extra_policy("/healthz")
    unsupported["metadata"]["name"] = "fqdn"
    unsupported["spec"]["egress"] = [{"toFQDNs": [{"matchName": "example.com"}]}]
    api.call(lambda: api.fake.put("ciliumnetworkpolicies", unsupported))
    try:
        label = "CiliumNetworkPolicy production/fqdn"
        wait_until(lambda: label in agent_status(lab.agent_socket)["policies"]["rejected"], "the rejection")

        def node_status() -> dict[str, Any]:
            obj = api.call(lambda: api.fake.objects["ciliumnetworkpolicies"][("production", "fqdn")])
            return dict(obj.get("status", {}).get("nodes", {}).get(lab.node_name, {}))

        wait_until(lambda: node_status().get("ok") is False, "the object's status")
        assert "toFQDNs" in node_status()["error"]
        assert status_code(lab, "prometheus", "GET", "/healthz") == "403"  # nothing of it applied
        assert status_code(lab, "prometheus", "GET", "/metrics") == "200"  # the rest in force
        _, metrics = agent_get(lab.agent_socket, "/metrics")
        assert "sidecarless_policies_rejected 1.0" in metrics
    finally:
        api.call(lambda: api.fake.delete("ciliumnetworkpolicies", "fqdn", "production"))
