import pytest

from sidecarless.policy.schema import HttpRule, LabelSelector, PolicyFileError, parse_policy_file


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyFileError) as raised:
        parse_policy_file("policies/p.yaml", text)
    return [str(error) for error in raised.value.errors]


def test_billing_policy_parses(billing_policy_text: str) -> None:
    (policy,) = parse_policy_file("billing.yaml", billing_policy_text)
    assert policy.key == "production/billing-api-l7-policy"
    assert policy.endpoint_selector == LabelSelector((("app", "billing-api"),))
    assert policy.ingress is not None
    first, second = policy.ingress
    assert first.from_endpoints == (LabelSelector((("app", "prometheus"),)),)
    assert first.to_ports[0].ports[0].port == 8080
    assert first.to_ports[0].ports[0].protocol == "TCP"
    assert first.to_ports[0].http == (HttpRule(method="GET", path="/metrics"),)
    assert second.to_ports[0].http == (HttpRule(method="POST", path="/api/v1/invoices/export"),)


def test_unknown_field_names_file_line_and_path(billing_policy_text: str) -> None:
    text = billing_policy_text.replace(
        "  - fromEndpoints: [{matchLabels: {app: finance-batch}}]\n    toPorts:",
        "  - fromEndpoints: [{matchLabels: {app: finance-batch}}]\n    toPort:",
    )
    assert errors_of(text) == [
        "policies/p.yaml:12: spec.ingress[1].toPort: unknown field (known: fromEndpoints, toPorts)"
    ]


def test_invalid_regex_is_rejected_with_re2_semantics(billing_policy_text: str) -> None:
    # Python's re accepts backreferences; RE2, Envoy's engine, does not.
    text = billing_policy_text.replace("path: /metrics", r"path: '/(a)\1'")
    (error,) = errors_of(text)
    assert error.startswith(
        "policies/p.yaml:10: spec.ingress[0].toPorts[0].rules.http[0].path: invalid regular"
    )


def test_every_error_is_reported(billing_policy_text: str) -> None:
    text = billing_policy_text.replace('port: "8080"', 'port: "80a"').replace(
        "method: POST", "method: [POST]"
    )
    assert errors_of(text) == [
        "policies/p.yaml:9: spec.ingress[0].toPorts[0].ports[0].port: must be a port number, not '80a'",
        "policies/p.yaml:13: spec.ingress[1].toPorts[0].ports[0].port: must be a port number, not '80a'",
        "policies/p.yaml:14: spec.ingress[1].toPorts[0].rules.http[0].method: must be a string, not a list",
    ]


def test_http_rules_need_tcp_and_a_port(billing_policy_text: str) -> None:
    text = billing_policy_text.replace(
        '{port: "8080", protocol: TCP}]\n      rules: {http: [{method: GET',
        '{port: "8080", protocol: UDP}]\n      rules: {http: [{method: GET',
    )
    assert errors_of(text) == [
        "policies/p.yaml:9: spec.ingress[0].toPorts[0].ports[0]: HTTP rules need an explicit protocol: TCP "
        "and a non-zero port"
    ]


def test_unsupported_fields_are_errors_not_ignored(billing_policy_text: str) -> None:
    text = billing_policy_text + "  egress: [{}]\n"
    assert errors_of(text) == [
        "policies/p.yaml:15: spec.egress: not supported by this version of sidecarless"
    ]


def test_yaml_syntax_error_names_the_line() -> None:
    assert errors_of("apiVersion: cilium.io/v2\nkind: [\n") == [
        "policies/p.yaml:3: invalid YAML: expected the node content, but found '<stream end>'",
    ]


def test_wrong_kind_and_missing_fields() -> None:
    assert errors_of("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n") == [
        "policies/p.yaml:1: spec: required field is missing",
        "policies/p.yaml:1: apiVersion: must be cilium.io/v2",
        "policies/p.yaml:2: kind: must be CiliumNetworkPolicy",
    ]


def test_namespace_label_source_prefix_is_stripped(billing_policy_text: str) -> None:
    text = billing_policy_text.replace(
        "{matchLabels: {app: prometheus}}",
        "{matchLabels: {app: prometheus, 'k8s:io.kubernetes.pod.namespace': ops}}",
    )
    (policy,) = parse_policy_file("p.yaml", text)
    assert policy.ingress is not None
    assert policy.ingress[0].from_endpoints == (
        LabelSelector((("app", "prometheus"), ("io.kubernetes.pod.namespace", "ops"))),
    )
