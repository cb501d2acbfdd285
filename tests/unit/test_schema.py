import pytest

from sidecarless.policy.model import (
    CidrRule,
    HeaderMatch,
    HeaderValue,
    HttpRule,
    LabelSelector,
    Requirement,
    SecretRef,
)
from sidecarless.policy.reader import PolicyFileError
from sidecarless.policy.schema import PolicyDocuments, parse_policy_file

HEAD = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: billing-api}}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyFileError) as raised:
        parse_policy_file("policies/p.yaml", text)
    return [str(error) for error in raised.value.errors]


def only_policy(text: str) -> PolicyDocuments:
    return parse_policy_file("p.yaml", text)


def test_billing_policy_parses(billing_policy_text: str) -> None:
    (policy,) = only_policy(billing_policy_text).policies
    assert policy.key == "production/billing-api-l7-policy"
    (rule,) = policy.rules
    assert rule.endpoint_selector == LabelSelector((("app", "billing-api"),))
    assert rule.ingress is not None and rule.egress is None
    first, second = rule.ingress
    assert first.peers.endpoints == (LabelSelector((("app", "prometheus"),)),)
    assert (first.to_ports[0].ports[0].port, first.to_ports[0].ports[0].protocol) == (8080, "TCP")
    assert first.to_ports[0].http == (HttpRule(method="GET", path="/metrics"),)
    assert second.to_ports[0].http == (HttpRule(method="POST", path="/api/v1/invoices/export"),)


def test_unknown_field_names_file_line_and_path(billing_policy_text: str) -> None:
    text = billing_policy_text.replace(
        "  - fromEndpoints: [{matchLabels: {app: finance-batch}}]\n    toPorts:",
        "  - fromEndpoints: [{matchLabels: {app: finance-batch}}]\n    toPort:",
    )
    assert errors_of(text) == [
        "policies/p.yaml:12: spec.ingress[1].toPort: unknown field "
        "(known: fromCIDR, fromCIDRSet, fromEndpoints, fromEntities, toPorts)"
    ]


def test_invalid_regex_is_rejected_with_re2_semantics(billing_policy_text: str) -> None:
    # Python's re accepts backreferences; RE2, Envoy's engine, does not.
    text = billing_policy_text.replace("path: /metrics", r"path: '/(a)\1'")
    (error,) = errors_of(text)
    assert error.startswith("policies/p.yaml:10: spec.ingress[0].toPorts[0].rules.http[0].path: invalid regular")


def test_every_error_is_reported(billing_policy_text: str) -> None:
    text = billing_policy_text.replace('port: "8080"', 'port: "80_80"').replace("method: POST", "method: [POST]")
    assert errors_of(text) == [
        "policies/p.yaml:9: spec.ingress[0].toPorts[0].ports[0].port: must be a port number or a port name, not '80_80'",
        "policies/p.yaml:13: spec.ingress[1].toPorts[0].ports[0].port: must be a port number or a port name, not '80_80'",
        "policies/p.yaml:14: spec.ingress[1].toPorts[0].rules.http[0].method: must be a string, not a list",
    ]


def test_http_rules_need_tcp_and_a_port() -> None:
    for port in ('{port: "80", protocol: UDP}', '{port: "80"}', '{port: "0", protocol: TCP}'):
        text = HEAD + f"  ingress: [{{toPorts: [{{ports: [{port}], rules: {{http: [{{method: GET}}]}}}}]}}]\n"
        assert errors_of(text) == [
            "policies/p.yaml:6: spec.ingress[0].toPorts[0].ports[0]: HTTP rules need an explicit protocol: TCP "
            "and a non-zero port"
        ]


def test_unsupported_fields_are_errors_not_ignored() -> None:
    assert errors_of(HEAD + "  egress: [{toFQDNs: [{matchName: x.example}]}]\n") == [
        "policies/p.yaml:6: spec.egress[0].toFQDNs: not supported by this version of sidecarless"
    ]


def test_yaml_syntax_error_names_the_line() -> None:
    assert errors_of("apiVersion: cilium.io/v2\nkind: [\n") == [
        "policies/p.yaml:3: invalid YAML: did not find expected node content",
    ]


def test_wrong_kind_and_missing_fields() -> None:
    assert errors_of("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n") == [
        "policies/p.yaml:1: apiVersion: must be cilium.io/v2",
        "policies/p.yaml:2: kind: must be CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or Secret",
    ]


def test_label_source_prefix_is_stripped_and_expressions_parsed() -> None:
    text = HEAD + (
        "  ingress:\n  - fromEndpoints:\n    - matchLabels: {'k8s:io.kubernetes.pod.namespace': ops}\n"
        "      matchExpressions:\n      - {key: 'k8s:tier', operator: In, values: [b, a]}\n"
        "      - {key: io.cilium.k8s.policy.cluster, operator: Exists}\n"
        "    toPorts: [{ports: [{port: '80'}]}]\n"
    )
    (policy,) = only_policy(text).policies
    assert policy.rules[0].ingress is not None
    assert policy.rules[0].ingress[0].peers.endpoints == (
        LabelSelector(
            (("io.kubernetes.pod.namespace", "ops"),),
            (Requirement("tier", "In", ("a", "b")), Requirement("io.cilium.k8s.policy.cluster", "Exists")),
        ),
    )


def test_bad_expressions_are_errors() -> None:
    text = HEAD + (
        "  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n"
        "      - {key: a, operator: Has}\n      - {key: b, operator: In}\n      - {key: c, operator: Exists, values: [x]}\n"
    )
    assert errors_of(text) == [
        "policies/p.yaml:9: spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator: must be one of In, NotIn, "
        "Exists, DoesNotExist",
        "policies/p.yaml:10: spec.ingress[0].fromEndpoints[0].matchExpressions[1].values: In needs at least one value",
        "policies/p.yaml:11: spec.ingress[0].fromEndpoints[0].matchExpressions[2].values: Exists takes no values",
    ]


def test_cidrs_entities_and_port_ranges() -> None:
    text = HEAD + (
        "  ingress:\n  - fromCIDR: [198.51.100.7/24]\n    fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]\n"
        "    fromEntities: [world, host]\n    toPorts: [{ports: [{port: '8000', endPort: 8100, protocol: TCP}, {port: http}]}]\n"
    )
    (policy,) = only_policy(text).policies
    assert policy.rules[0].ingress is not None
    (item,) = policy.rules[0].ingress
    assert item.peers.cidrs == (CidrRule("198.51.100.0/24"), CidrRule("10.0.0.0/8", ("10.1.0.0/16",)))
    assert item.peers.entities == ("world", "host")
    low, named = item.to_ports[0].ports
    assert (low.port, low.end_port, low.protocol) == (8000, 8100, "TCP")
    assert (named.name, named.protocol) == ("http", "ANY")


def test_bad_cidrs_entities_and_ranges_are_errors() -> None:
    text = HEAD + (
        "  ingress:\n  - fromCIDR: [10.0.0.0/33]\n    fromCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]\n"
        "    fromEntities: [everyone]\n    toPorts: [{ports: [{port: '8000', endPort: 7000}, {port: http, endPort: 90}]}]\n"
    )
    assert errors_of(text) == [
        "policies/p.yaml:7: spec.ingress[0].fromCIDR[0]: '10.0.0.0/33' is not a CIDR (such as 10.0.0.0/8 or fd00::/8)",
        "policies/p.yaml:8: spec.ingress[0].fromCIDRSet[0].except[0]: 192.168.0.0/16 is not inside 10.0.0.0/8",
        "policies/p.yaml:9: spec.ingress[0].fromEntities[0]: unknown entity 'everyone' (known: all, world, cluster, "
        "host, remote-node, kube-apiserver, health, init, unmanaged, ingress)",
        "policies/p.yaml:10: spec.ingress[0].toPorts[0].ports[0].endPort: 7000 is lower than port 8000",
        "policies/p.yaml:10: spec.ingress[0].toPorts[0].ports[1].endPort: needs a numeric, non-zero port",
    ]


def test_headers_header_matches_and_secrets() -> None:
    text = HEAD + (
        "  egress:\n  - toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n      rules:\n        http:\n"
        "        - headers: ['X-Token: 42', X-Present]\n"
        "          headerMatches: [{name: Authorization, mismatch: REPLACE, secret: {namespace: ns, name: s}}]\n"
        "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: ns}\ndata: {value: QmVhcmVyIDEyMzQ1Ng==}\n"
    )
    documents = only_policy(text)
    (policy,) = documents.policies
    assert policy.rules[0].egress is not None
    (rule,) = policy.rules[0].egress[0].to_ports[0].http or ()
    assert rule.headers == (HeaderValue("x-token", "42"), HeaderValue("x-present", None))
    assert rule.header_matches == (HeaderMatch("authorization", None, SecretRef("ns", "s"), "REPLACE"),)
    (secret,) = documents.secrets
    assert secret.value() == "Bearer 123456"


def test_deny_rules_take_no_l7_rules_and_ccnp_no_namespace() -> None:
    text = HEAD.replace("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy") + (
        "  ingressDeny: [{toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{}]}}]}]\n"
    )
    assert errors_of(text) == [
        "policies/p.yaml:3: metadata.namespace: a CiliumClusterwideNetworkPolicy has no namespace",
        "policies/p.yaml:6: spec.ingressDeny[0].toPorts[0].rules: deny rules are L3/L4 only: L7 rules are not allowed",
    ]


def test_enable_default_deny_and_specs() -> None:
    text = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: production}
specs:
- endpointSelector: {}
  enableDefaultDeny: {ingress: false}
  ingress: [{fromEntities: [cluster]}]
- endpointSelector: {matchLabels: {app: x}}
  egress: [{}]
"""
    (policy,) = only_policy(text).policies
    first, second = policy.rules
    assert not first.default_deny_ingress and first.default_deny_egress
    assert second.egress is not None and len(second.egress) == 1 and second.egress[0].peers.any_peer


def test_at_most_40_ports_per_rule() -> None:
    ports = ", ".join(f"{{port: '{8000 + n}'}}" for n in range(41))
    assert errors_of(HEAD + f"  ingress: [{{toPorts: [{{ports: [{ports}]}}]}}]\n") == [
        "policies/p.yaml:6: spec.ingress[0].toPorts[0].ports: at most 40 ports per rule"
    ]


def test_regex_too_complex_for_envoy_is_a_validation_error() -> None:
    (error,) = errors_of(
        HEAD
        + "  ingress: [{toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{path: '(a|b|c|d|e|f|g|h){40}'}]}}]}]\n"
    )
    assert "too complex for Envoy: RE2 program size" in error and "> 100" in error
