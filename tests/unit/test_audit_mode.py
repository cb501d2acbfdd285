"""Audit mode per policy (issue 17), in the pure core: the annotation, and the two verdicts `policy trace`
shows: the enforced one (policies not in audit mode) and the audit one (all of them)."""

import textwrap

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecarless.lab.pods import NODE_IP, endpoints_of, parse_pods, place
from sidecarless.policy.audit import EVERY_REQUEST, audit_rule, with_audit
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import EGRESS, INGRESS, HttpRule, Node, Policy, enforced_policies
from sidecarless.policy.plan import ALLOW, DENY, NONE, REDIRECT, DirectionPolicy, Plan, PolicyEntry
from sidecarless.policy.reader import PolicyFileError
from sidecarless.policy.schema import parse_policy_file
from sidecarless.policy.trace import ALLOWED, DENIED, DROPPED, FORWARDED, Request, Trace, trace_with_audit
from sidecarless.redirect.maps import (
    ACTION_ALLOW,
    ACTION_REDIRECT,
    ENDPOINT_AUDIT_ENFORCE_SHIFT,
    ENDPOINT_AUDIT_SHIFT,
    ENDPOINT_ENFORCE,
    PolicyKey,
    PolicyValue,
    endpoint_ids,
    redirect_key,
    render_maps,
)
from sidecarless.xds.render import AUDIT_RBAC, INGRESS_RBAC, LISTENERS, RULE_RBAC, audit_result_key, render
from sidecarless.xds.resources import LISTENER_TYPE, ROUTE_TYPE
from sidecarless.xds.snapshot import Snapshot
from tests.unit.test_policy_semantics import PODS

PORTS = {INGRESS: 15001, EGRESS: 15002}

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


# --- The plan the datapath and Envoy apply: enforced verdicts, audit verdicts beside them (policy/audit.py) ---

AUDITED = 'namespace: production, annotations: {policy.sidecarless.io/audit: "true"}}'
# The billing-api example policy in audit mode: nothing else selects billing-api.
AUDITED_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: production, annotations: {policy.sidecarless.io/audit: "true"}}
spec:
  endpointSelector: {matchLabels: {app: billing-api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: prometheus}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET, path: /metrics}]}
"""


def merged(policies: list[Policy]) -> tuple[Plan, Plan, Plan]:
    """(enforced, audit, what the datapath applies)."""
    endpoints = endpoints_of(place(parse_pods("pods.yaml", PODS)))
    node = Node(ips=(NODE_IP,))
    enforced = compile_plan(enforced_policies(policies), endpoints, node, population_policies=policies)
    audit = compile_plan(policies, endpoints, node)
    return enforced, audit, with_audit(enforced, audit)


def identity_of(plan: Plan, pod: str) -> int:
    endpoint = plan.endpoint(pod)
    assert endpoint is not None
    return endpoint.identity


def test_an_audited_l7_policy_on_an_unselected_pod_sends_its_port_to_envoy_with_every_request_passing() -> None:
    enforced, _, applied = merged(policies_of(AUDITED_L7))
    billing = applied.endpoint("billing-api")
    assert billing is not None
    assert not billing.ingress.enforced and billing.ingress.audit_enforced is True
    assert billing.egress.audit_enforced is None and billing.egress is enforced.endpoint("billing-api").egress  # type: ignore[union-attr]
    (entry,) = billing.ingress.entries
    assert (entry.peer_identity, entry.protocol, entry.low, entry.high) == (
        identity_of(applied, "prometheus"),
        "TCP",
        8080,
        8080,
    )
    assert entry.action == REDIRECT and entry.http == EVERY_REQUEST and entry.origins == ()
    assert entry.audit is not None and entry.audit.proxied_for_audit and entry.audit.action == REDIRECT
    assert [(rule.method, rule.path) for rule in entry.audit.http] == [("GET", "/metrics")]
    assert entry.audit.origins == ("production/l7 spec.ingress[0]",)
    # Every other pod is the enforced plan's own object: nothing to audit there.
    others = [e for e in applied.endpoints if e.endpoint.name != "billing-api"]
    assert all(any(e is o for o in enforced.endpoints) for e in others)
    assert with_audit(enforced, None) is enforced


def test_the_kernel_gets_both_verdicts_and_a_redirect_for_audit_alone_is_allowed_until_envoy_can_take_it() -> None:
    _, _, applied = merged(policies_of(AUDITED_L7))
    billing = applied.endpoint("billing-api")
    assert billing is not None
    key = PolicyKey(endpoint_ids(applied)["production/billing-api"], identity_of(applied, "prometheus"), 0, 6, 8080, 16)
    waiting = render_maps(applied, PORTS, frozenset())
    assert waiting.policy[key] == PolicyValue(ACTION_ALLOW, 0, ACTION_REDIRECT)
    ready = render_maps(
        applied, PORTS, frozenset({redirect_key("production/billing-api", INGRESS, billing.ingress.entries[0])})
    )
    assert ready.policy[key] == PolicyValue(ACTION_REDIRECT, PORTS[INGRESS], ACTION_REDIRECT)
    # Not enforced; audited, in default deny for the audit verdict.
    flags = ready.endpoints[billing.endpoint.ip].flags
    assert flags == (ENDPOINT_ENFORCE[INGRESS] << ENDPOINT_AUDIT_SHIFT) | (
        ENDPOINT_ENFORCE[INGRESS] << ENDPOINT_AUDIT_ENFORCE_SHIFT
    )


def test_an_audited_deny_is_an_allow_with_a_deny_beside_it() -> None:
    deny = L4_ALLOW.replace("name: l4", "name: deny").replace("namespace: production}", AUDITED)
    deny = deny.replace("ingress:", "ingressDeny:")
    _, _, applied = merged(policies_of(L4_ALLOW, deny))
    billing = applied.endpoint("billing-api")
    assert billing is not None and billing.ingress.enforced and billing.ingress.audit_enforced
    (entry,) = [e for e in billing.ingress.entries if e.low == 8080]
    assert entry.action == ALLOW and entry.audit is not None and entry.audit.action == DENY
    assert entry.origins == ("production/l4 spec.ingress[0]",)
    assert entry.audit.origins == ("production/deny spec.ingressDeny[0]",)
    prometheus = identity_of(applied, "prometheus")
    assert audit_rule(applied, "production/billing-api", INGRESS, prometheus, "TCP", 8080) == (
        "production/deny spec.ingressDeny[0]"
    )
    dev_tool = identity_of(applied, "dev-tool")
    assert audit_rule(applied, "production/billing-api", INGRESS, dev_tool, "TCP", 8080) == (
        "default deny of ingress of production/billing-api (selected by production/deny, production/l4)"
    )
    assert audit_rule(applied, "production/prometheus", EGRESS, dev_tool, "TCP", 8080) == ""


def test_an_audited_chain_has_rbac_filters_that_only_report_and_logs_what_they_would_deny() -> None:
    _, _, applied = merged(policies_of(AUDITED_L7))
    snapshot = Snapshot.from_resources(render(applied, PORTS))
    listener = listener_pb2.Listener()
    snapshot.resources[LISTENER_TYPE][LISTENERS[INGRESS]].body.Unpack(listener)
    (chain,) = listener.filter_chains
    manager = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(manager)
    # The audit filter first: it sees the requests the enforcing one denies.
    assert [f.name for f in manager.http_filters] == [
        AUDIT_RBAC[INGRESS],
        INGRESS_RBAC,
        RULE_RBAC[INGRESS],
        "envoy.filters.http.router",
    ]
    audit_filter = rbac_pb2.RBAC()
    manager.http_filters[0].typed_config.Unpack(audit_filter)
    assert not audit_filter.HasField("rules") and not audit_filter.HasField("shadow_rules")
    logged = manager.access_log[0].filter.or_filter.filters
    assert logged[-1].metadata_filter.matcher.path[0].key == audit_result_key(INGRESS)
    route = route_pb2.RouteConfiguration()
    snapshot.resources[ROUTE_TYPE]["ingress/production/billing-api"].body.Unpack(route)
    per_filter = route.virtual_hosts[0].routes[0].typed_per_filter_config
    enforcing, auditing = rbac_pb2.RBACPerRoute(), rbac_pb2.RBACPerRoute()
    per_filter[INGRESS_RBAC].Unpack(enforcing)
    per_filter[AUDIT_RBAC[INGRESS]].Unpack(auditing)
    (allow_all,) = enforcing.rbac.rules.policies.values()
    assert allow_all.permissions[0].and_rules.rules[1].or_rules.rules[0].any
    assert not auditing.rbac.HasField("rules") and auditing.rbac.shadow_rules_stat_prefix == "audit_ingress_"
    (get_only,) = auditing.rbac.shadow_rules.policies.values()
    _, path = get_only.permissions[0].and_rules.rules[1].or_rules.rules[0].and_rules.rules
    assert path.url_path.path.safe_regex.regex == "/metrics"
    # Without audited policies nothing of it is rendered.
    plain = Snapshot.from_resources(render(merged(policies_of(L4_ALLOW))[2], PORTS))
    assert LISTENERS[INGRESS] not in plain.resources[LISTENER_TYPE]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["l4", "deny", "l7", "l7-loose", "egress"]), min_size=1, max_size=4, unique=True),
    st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_the_applied_plan_decides_as_the_enforced_one_and_audits_as_the_audit_one(
    names: list[str], audited: list[bool]
) -> None:
    """For every pod, direction, peer, protocol and port edge: the applied entries give the enforced plan's
    verdict (a redirect for audit alone being an allow) and the audit plan's beside it."""
    documents = []
    for name, audit in zip(names, [*audited, False], strict=False):
        text = GENERATED[name]
        documents.append(text.replace("namespace: production}", AUDITED) if audit else text)
    enforced, audit, applied = merged(policies_of(*documents))
    peers = [0, *(identity.number for identity in applied.identities)]
    for endpoint in applied.endpoints:
        for direction in (INGRESS, EGRESS):
            rules = endpoint.direction(direction)
            want_enforced = enforced.endpoint(endpoint.endpoint.key).direction(direction)  # type: ignore[union-attr]
            want_audit = audit.endpoint(endpoint.endpoint.key).direction(direction)  # type: ignore[union-attr]
            for peer in peers:
                for protocol in ("TCP", "UDP"):
                    for port in (0, 79, 80, 81, 5432, 8079, 8080, 8081, 9090, 65535):
                        entry = rules.verdict(peer, protocol, port)
                        assert _action(want_enforced, peer, protocol, port) == _enforced_action(rules, entry)
                        assert _action(want_audit, peer, protocol, port) == _audit_action(rules, entry)


GENERATED = {
    "l4": L4_ALLOW,
    "deny": L4_ALLOW.replace("name: l4", "name: deny").replace("ingress:", "ingressDeny:"),
    "l7": AUDITED_L7.replace(', annotations: {policy.sidecarless.io/audit: "true"}}', "}"),
    "l7-loose": AUDITED_L7.replace(', annotations: {policy.sidecarless.io/audit: "true"}}', "}")
    .replace("name: l7", "name: loose")
    .replace("app: prometheus", "app: dev-tool")
    .replace("{method: GET, path: /metrics}", "{path: /x.*}"),
    "egress": L4_ALLOW.replace("name: l4", "name: out")
    .replace("app: billing-api", "app: prometheus")
    .replace("ingress:\n  - fromEndpoints: [{matchLabels: {app: prometheus}}]", "egress:\n  - toEndpoints: [{}]")
    .replace('"8080"', '"80"'),
}


def _action(rules: DirectionPolicy, peer: int, protocol: str, port: int) -> tuple[str, tuple[HttpRule, ...]]:
    entry = rules.verdict(peer, protocol, port)
    if entry is None:
        return (NONE if rules.enforced else ALLOW), ()
    return entry.action, entry.http


def _enforced_action(rules: DirectionPolicy, entry: PolicyEntry | None) -> tuple[str, tuple[HttpRule, ...]]:
    if entry is None:
        return (NONE if rules.enforced else ALLOW), ()
    if entry.audit is not None and entry.audit.proxied_for_audit:
        return ALLOW, ()
    return entry.action, entry.http


def _audit_action(rules: DirectionPolicy, entry: PolicyEntry | None) -> tuple[str, tuple[HttpRule, ...]]:
    if rules.audit_enforced is None:
        return _enforced_action(rules, entry)  # not audited: the audit verdict is the enforced one
    if entry is None:
        return (NONE if rules.audit_enforced else ALLOW), ()
    assert entry.audit is not None
    return entry.audit.action, entry.audit.http
