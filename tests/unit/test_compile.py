from sidecarless.policy.compile import (
    ANY_IDENTITY,
    Endpoint,
    KernelAllow,
    Plan,
    compile_plan,
)
from sidecarless.policy.schema import HttpRule, parse_policy_file
from sidecarless.redirect.maps import (
    ACTION_ALLOW,
    ACTION_PROXY_UNAVAILABLE,
    ACTION_REDIRECT,
    PolicyKey,
    PolicyValue,
    render_maps,
)

PODS = {
    "billing-api": "10.244.1.10",
    "prometheus": "10.244.1.11",
    "finance-batch": "10.244.1.12",
    "dev-tool": "10.244.1.13",
}
ENDPOINTS = [
    Endpoint(name, "production", (("app", name),), ip, f"lxc{index}")
    for index, (name, ip) in enumerate(PODS.items())
]
EXTRA_5432_RULE = """  - fromEndpoints: [{matchLabels: {app: finance-batch}}]
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
"""


def plan_for(text: str, endpoints: list[Endpoint] = ENDPOINTS) -> Plan:
    return compile_plan(parse_policy_file("p.yaml", text), endpoints)


def identity(plan: Plan, name: str) -> int:
    return next(e.identity for e in plan.endpoints if e.endpoint.name == name)


def test_billing_api_plan(billing_policy_text: str) -> None:
    plan = plan_for(billing_policy_text)
    billing = next(e for e in plan.endpoints if e.endpoint.name == "billing-api")
    assert billing.ingress_enforced
    prometheus, finance = identity(plan, "prometheus"), identity(plan, "finance-batch")
    assert set(billing.kernel) == {
        KernelAllow(prometheus, 8080, "TCP", redirect=True),
        KernelAllow(finance, 8080, "TCP", redirect=True),
    }
    (port,) = billing.proxied
    assert port.port == 8080
    rules = {allow.peer.ips: allow.http for allow in port.allows}
    assert rules == {
        ("10.244.1.11",): (HttpRule("GET", "/metrics"),),
        ("10.244.1.12",): (HttpRule("POST", "/api/v1/invoices/export"),),
    }
    others = [e for e in plan.endpoints if e.endpoint.name != "billing-api"]
    assert all(not e.ingress_enforced and not e.kernel for e in others)


def test_same_input_gives_equal_plan_and_stable_identities(billing_policy_text: str) -> None:
    first = plan_for(billing_policy_text)
    second = plan_for(billing_policy_text, list(reversed(ENDPOINTS)))
    assert first == second and first.digest() == second.digest()
    # Identities depend on labels only: another pod joining does not renumber the others.
    joined = plan_for(
        billing_policy_text, [*ENDPOINTS, Endpoint("x", "production", (("app", "x"),), "10.244.1.99", "lxc9")]
    )
    assert identity(joined, "prometheus") == identity(first, "prometheus")


def test_l4_rule_keeps_5432_in_the_kernel(billing_policy_text: str) -> None:
    plan = plan_for(billing_policy_text + EXTRA_5432_RULE)
    billing = next(e for e in plan.endpoints if e.endpoint.name == "billing-api")
    assert KernelAllow(identity(plan, "finance-batch"), 5432, "TCP", redirect=False) in billing.kernel
    assert [port.port for port in billing.proxied] == [8080]


def test_l4_allow_for_the_same_peer_shadows_l7(billing_policy_text: str) -> None:
    shadow = """  - fromEndpoints: [{matchLabels: {app: prometheus}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
"""
    plan = plan_for(billing_policy_text + shadow)
    billing = next(e for e in plan.endpoints if e.endpoint.name == "billing-api")
    prometheus = identity(plan, "prometheus")
    assert KernelAllow(prometheus, 8080, "TCP", redirect=False) in billing.kernel
    assert KernelAllow(prometheus, 8080, "TCP", redirect=True) not in billing.kernel
    assert [allow.peer.ips for allow in billing.proxied[0].allows] == [("10.244.1.12",)]


def test_peer_selector_without_namespace_means_the_policy_namespace(billing_policy_text: str) -> None:
    elsewhere = Endpoint("prometheus", "monitoring", (("app", "prometheus"),), "10.244.1.50", "lxc8")
    plan = plan_for(billing_policy_text, [*ENDPOINTS, elsewhere])
    billing = next(e for e in plan.endpoints if e.endpoint.name == "billing-api")
    ips = {ip for port in billing.proxied for allow in port.allows for ip in allow.peer.ips}
    assert "10.244.1.50" not in ips
    explicit = billing_policy_text.replace(
        "{matchLabels: {app: prometheus}}",
        "{matchLabels: {app: prometheus, k8s:io.kubernetes.pod.namespace: monitoring}}",
    )
    plan = plan_for(explicit, [*ENDPOINTS, elsewhere])
    billing = next(e for e in plan.endpoints if e.endpoint.name == "billing-api")
    ips = {ip for port in billing.proxied for allow in port.allows for ip in allow.peer.ips}
    assert ips == {"10.244.1.50", "10.244.1.12"}


def test_l3_only_allow_from_any_peer_lets_icmp_through() -> None:
    text = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: open, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: billing-api}}
  ingress: [{}]
"""
    billing = next(e for e in plan_for(text).endpoints if e.endpoint.name == "billing-api")
    assert {(k.peer_identity, k.port, k.protocol) for k in billing.kernel} == {
        (ANY_IDENTITY, 0, "TCP"),
        (ANY_IDENTITY, 0, "UDP"),
        (ANY_IDENTITY, 0, "ICMP"),
    }


def test_empty_ingress_list_denies_everything() -> None:
    text = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: closed, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: billing-api}}
  ingress: []
"""
    billing = next(e for e in plan_for(text).endpoints if e.endpoint.name == "billing-api")
    assert billing.ingress_enforced and not billing.kernel


def test_redirect_entries_only_for_acked_ports(billing_policy_text: str) -> None:
    plan = plan_for(billing_policy_text + EXTRA_5432_RULE)
    finance = identity(plan, "finance-batch")
    before_ack = render_maps(plan, 15001, frozenset())
    assert before_ack.policy[PolicyKey("10.244.1.10", finance, 5432, 6)] == PolicyValue(ACTION_ALLOW, 0)
    assert before_ack.policy[PolicyKey("10.244.1.10", finance, 8080, 6)] == PolicyValue(
        ACTION_PROXY_UNAVAILABLE, 0
    )
    after_ack = render_maps(plan, 15001, frozenset({("10.244.1.10", 8080)}))
    assert after_ack.policy[PolicyKey("10.244.1.10", finance, 8080, 6)] == PolicyValue(ACTION_REDIRECT, 15001)
    assert after_ack.endpoints["10.244.1.10"].flags == 1
    assert after_ack.endpoints["10.244.1.11"].flags == 0
