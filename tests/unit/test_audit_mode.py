"""Audit mode per policy (issue 17), in the pure core: the annotation, and the two verdicts `policy trace`
shows: the enforced one (policies not in audit mode) and the audit one (all of them)."""

import textwrap

import pytest

from sidecarless.lab.pods import NODE_IP, endpoints_of, parse_pods, place
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Node, Policy, enforced_policies
from sidecarless.policy.reader import PolicyFileError
from sidecarless.policy.schema import parse_policy_file
from sidecarless.policy.trace import ALLOWED, DENIED, DROPPED, FORWARDED, Request, Trace, trace_with_audit
from tests.unit.test_policy_semantics import PODS

L4_ALLOW = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l4, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: billing-api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: prometheus}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
# Tightening: GET /metrics only, from prometheus; audited.
L7_TIGHTEN = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: l7
  namespace: production
  annotations: {policy.sidecarless.io/audit: "true", other.example/x: "y"}
spec:
  endpointSelector: {matchLabels: {app: other-api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: prometheus}}]
    toPorts:
    - ports: [{port: "9090", protocol: TCP}]
      rules: {http: [{method: GET, path: /metrics}]}
"""


def policies_of(*documents: str) -> list[Policy]:
    policies: list[Policy] = []
    for index, text in enumerate(documents):
        policies += parse_policy_file(f"p{index}.yaml", textwrap.dedent(text)).policies
    return policies


def traced(policies: list[Policy], source: str, destination: str, port: int, request: Request | None) -> Trace:
    endpoints = endpoints_of(place(parse_pods("pods.yaml", PODS)))
    node = Node(ips=(NODE_IP,))
    plan = compile_plan(enforced_policies(policies), endpoints, node, population_policies=policies)
    audit_plan = compile_plan(policies, endpoints, node) if any(p.audit for p in policies) else None
    return trace_with_audit(plan, audit_plan, source, destination, port, "TCP", request)


def test_the_annotation_puts_a_policy_in_audit_mode() -> None:
    (audited,) = policies_of(L7_TIGHTEN)
    (enforced,) = policies_of(L4_ALLOW)
    assert audited.audit and not enforced.audit
    (explicit,) = policies_of(L7_TIGHTEN.replace('"true"', '"false"'))
    assert not explicit.audit


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("maybe", 'must be "true" or "false" (a string), not \'maybe\''),
        ("yes", 'must be "true" or "false" (a string), not True'),  # YAML 1.1 reads yes as a boolean
        ("true", 'must be "true" or "false" (a string), not True'),  # YAML's boolean, not the string
    ],
)
def test_an_annotation_value_other_than_the_strings_is_an_error_with_file_line_and_field(
    value: str, message: str
) -> None:
    text = L7_TIGHTEN.replace('policy.sidecarless.io/audit: "true"', f"policy.sidecarless.io/audit: {value}")
    with pytest.raises(PolicyFileError) as raised:
        policies_of(text)
    assert f"p0.yaml:7: metadata.annotations.policy.sidecarless.io/audit: {message}" in str(raised.value)


def test_annotations_that_are_not_a_mapping_are_an_error() -> None:
    text = L7_TIGHTEN.replace(
        'annotations: {policy.sidecarless.io/audit: "true", other.example/x: "y"}', "annotations: [x]"
    )
    with pytest.raises(PolicyFileError, match=r"metadata\.annotations: must be a mapping"):
        policies_of(text)


def test_an_audited_tightening_is_enforced_as_if_absent_and_traced_as_it_would_decide() -> None:
    """other-api has no policy in force: everything reaches it. The audited policy would allow GET /metrics
    from prometheus only: POST from prometheus and anything from dev-tool would be stopped."""
    policies = policies_of(L4_ALLOW, L7_TIGHTEN)
    post = traced(policies, "prometheus", "other-api", 9090, Request("POST", "/metrics"))
    assert post.verdict == ALLOWED and post.audit is not None
    assert (post.audit.verdict, post.audit.status) == (DENIED, 403) and post.audit_differs
    assert any("production/l7 spec.ingress[0]" in step for step in post.audit.steps)
    get = traced(policies, "prometheus", "other-api", 9090, Request("GET", "/metrics"))
    assert get.verdict == ALLOWED and get.audit is not None and get.audit.verdict == FORWARDED
    assert not get.audit_differs
    other = traced(policies, "dev-tool", "other-api", 9090, Request("GET", "/metrics"))
    assert other.verdict == ALLOWED and other.audit is not None and other.audit.verdict == DROPPED
    assert other.audit_differs and other.audit.reason == "Policy denied"


def test_an_audited_loosening_is_reported_where_it_would_let_through_what_is_now_dropped() -> None:
    """billing-api allows prometheus on 8080 (enforced); an audited policy would also allow dev-tool."""
    loosen = L4_ALLOW.replace("name: l4", "name: loosen").replace("app: prometheus", "app: dev-tool")
    loosen = loosen.replace(
        "namespace: production}", 'namespace: production, annotations: {policy.sidecarless.io/audit: "true"}}'
    )
    policies = policies_of(L4_ALLOW, loosen)
    result = traced(policies, "dev-tool", "billing-api", 8080, None)
    assert result.verdict == DROPPED and result.audit is not None and result.audit.verdict == ALLOWED
    assert result.audit_differs


def test_without_audited_policies_there_is_one_verdict() -> None:
    result = traced(policies_of(L4_ALLOW), "prometheus", "billing-api", 8080, None)
    assert result.audit is None and not result.audit_differs and "audit" not in result.as_dict()


def test_from_kubernetes_the_audit_annotation_is_kept_and_the_others_left_out() -> None:
    """A CiliumNetworkPolicy object as the API server returns it: the audit annotation reaches the parser;
    kubectl's last-applied copy does not (every apply would look like a change)."""
    from sidecarless.sources.kubernetes import policy_bytes

    obj = {
        "metadata": {
            "name": "l7",
            "namespace": "production",
            "resourceVersion": "7",
            "annotations": {
                "policy.sidecarless.io/audit": "true",
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
            },
        },
        "spec": {"endpointSelector": {"matchLabels": {"app": "other-api"}}},
    }
    document = policy_bytes("CiliumNetworkPolicy", obj)
    assert b"last-applied" not in document
    (policy,) = parse_policy_file("cnp.json", document.decode()).policies
    assert policy.audit


WORLD_CIDR = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: prometheus}}
  egress:
  - toCIDR: [198.51.0.0/16]
"""


def test_the_enforced_plan_numbers_identities_as_the_audit_plan_and_decides_as_without_the_audited() -> None:
    """An audited policy naming a narrower prefix splits the enforced rule's CIDR identity in two: both plans
    hold the same identities and ipcache, and the enforced verdicts are those of the enforced policies alone."""
    narrower = WORLD_CIDR.replace("name: out", "name: narrower").replace("198.51.0.0/16", "198.51.100.0/24")
    narrower = narrower.replace(
        "namespace: production}", 'namespace: production, annotations: {policy.sidecarless.io/audit: "true"}}'
    )
    narrower = narrower.replace("egress:\n  - toCIDR", "egressDeny:\n  - toCIDR")
    policies = policies_of(WORLD_CIDR, narrower)
    endpoints = endpoints_of(place(parse_pods("pods.yaml", PODS)))
    node = Node(ips=(NODE_IP,))
    enforced = compile_plan(enforced_policies(policies), endpoints, node, population_policies=policies)
    audit = compile_plan(policies, endpoints, node)
    alone = compile_plan(enforced_policies(policies), endpoints, node)
    assert (enforced.identities, enforced.ipcache) == (audit.identities, audit.ipcache)
    assert len(enforced.ipcache) > len(alone.ipcache)
    for address in ("198.51.100.10", "198.51.7.1", "203.0.113.5"):
        expected = trace_with_audit(alone, None, "prometheus", address, 80).verdict
        result = trace_with_audit(enforced, audit, "prometheus", address, 80)
        assert result.verdict == expected, address
        assert result.audit is not None
    # The audited deny covers the /24 only.
    assert trace_with_audit(enforced, audit, "prometheus", "198.51.100.10", 80).audit_differs
    assert not trace_with_audit(enforced, audit, "prometheus", "198.51.7.1", 80).audit_differs
