"""Each statement of POLICY.md, through the compiler and the offline verdict (`policy trace`).

The e2e tier checks the same statements against the real kernel and Envoy, and a differential test holds the
offline verdict to the datapath.
"""

import textwrap
from dataclasses import replace

from sidecarless.lab.pods import NODE_IP, endpoints_of, parse_pods, place
from sidecarless.policy.compile import compile_plan
from sidecarless.policy.model import Node
from sidecarless.policy.plan import Plan
from sidecarless.policy.schema import parse_policy_file
from sidecarless.policy.trace import Request, trace

PODS = """
pods:
  - {name: billing-api, namespace: production, labels: {app: billing-api, tier: backend},
     serve: [{port: 8080, protocol: http, name: http}, {port: 5432, protocol: tcp}, {port: 53, protocol: udp}]}
  - {name: prometheus, namespace: production, labels: {app: prometheus}}
  - {name: finance-batch, namespace: production, labels: {app: finance-batch}, serviceAccount: batch}
  - {name: dev-tool, namespace: production, labels: {app: dev-tool}}
  - {name: other-api, namespace: production, labels: {app: other-api, tier: backend},
     serve: [{port: 9090, protocol: http, name: http}]}
  - {name: prometheus-mon, namespace: monitoring, labels: {app: prometheus}}
external:
  - {name: internet, ip: 198.51.100.10, serve: [{port: 80, protocol: http}]}
"""
BILLING_HEAD = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: billing-api}}
"""
INTERNET = "198.51.100.10"


def plan_of(*documents: str) -> Plan:
    pods = parse_pods("pods.yaml", PODS)
    policies = []
    secrets = []
    for index, text in enumerate(documents):
        parsed = parse_policy_file(f"p{index}.yaml", textwrap.dedent(text))
        policies += parsed.policies
        secrets += parsed.secrets
    return compile_plan(policies, endpoints_of(place(pods)), Node(ips=(NODE_IP,)), secrets)


def http(plan: Plan, source: str, destination: str, port: int = 8080, method: str = "GET", path: str = "/",
         headers: tuple[tuple[str, str], ...] = (), host: str | None = None) -> str:  # fmt: skip
    """200, 403, 400 or dropped (kernel verdicts that let the flow through count as 200: the server answers)."""
    result = trace(plan, source, destination, port, "TCP", Request(method, path, host, headers))
    if result.verdict == "dropped":
        return "dropped"
    return str(result.status or 200)


def flow(plan: Plan, source: str, destination: str, port: int, protocol: str = "TCP") -> str:
    return trace(plan, source, destination, port, protocol).verdict


def billing(ingress: str) -> str:
    return BILLING_HEAD + "  ingress:\n" + textwrap.indent(textwrap.dedent(ingress).strip("\n"), "  ") + "\n"


BILLING_POLICY = billing("""
- fromEndpoints: [{matchLabels: {app: prometheus}}]
  toPorts:
  - ports: [{port: "8080", protocol: TCP}]
    rules: {http: [{method: GET, path: /metrics}]}
- fromEndpoints: [{matchLabels: {app: finance-batch}}]
  toPorts:
  - ports: [{port: "8080", protocol: TCP}]
    rules: {http: [{method: POST, path: /api/v1/invoices/export}]}
""")


# Selection and default deny


def test_billing_api_table() -> None:
    plan = plan_of(BILLING_POLICY)
    assert http(plan, "prometheus", "billing-api", path="/metrics") == "200"
    assert http(plan, "prometheus", "billing-api", path="/metrics?name=x") == "200"
    assert http(plan, "prometheus", "billing-api", method="POST", path="/metrics") == "403"
    assert http(plan, "prometheus", "billing-api", path="/metrics/") == "403"
    assert http(plan, "prometheus", "billing-api", path="/api/v1/invoices/export") == "403"
    assert http(plan, "finance-batch", "billing-api", method="POST", path="/api/v1/invoices/export") == "200"
    assert http(plan, "finance-batch", "billing-api", path="/api/v1/invoices/export") == "403"
    assert http(plan, "finance-batch", "billing-api", path="/metrics") == "403"
    assert http(plan, "dev-tool", "billing-api", path="/metrics") == "dropped"
    assert http(plan, "prometheus", "billing-api", path="//metrics") == "200"
    assert http(plan, "prometheus", "billing-api", path="/x/../metrics") == "200"
    assert http(plan, "prometheus", "billing-api", path="/api/v1/invoices/../../metrics") == "403"  # /api/metrics
    assert http(plan, "prometheus", "billing-api", path="/api/v1/invoices/../../../metrics") == "200"
    for source in ("dev-tool", "prometheus", "finance-batch"):
        assert flow(plan, source, "billing-api", 5432) == "dropped"


def test_selector_selects_only_in_the_policy_namespace() -> None:
    text = BILLING_HEAD.replace("app: billing-api", "app: prometheus") + "  ingress: []\n"
    plan = plan_of(text)
    assert plan.endpoint("prometheus").ingress.enforced  # type: ignore[union-attr]
    assert not plan.endpoint("monitoring/prometheus-mon").ingress.enforced  # type: ignore[union-attr]


def test_a_section_switches_default_deny_on_for_its_direction_only() -> None:
    plan = plan_of(billing("- fromEndpoints: [{matchLabels: {app: prometheus}}]"))
    billing_api = plan.endpoint("billing-api")
    assert billing_api is not None and billing_api.ingress.enforced and not billing_api.egress.enforced
    assert flow(plan, "dev-tool", "billing-api", 5432) == "dropped"
    assert flow(plan, "billing-api", INTERNET, 80) == "allowed"
    assert flow(plan, "dev-tool", "other-api", 9090) == "allowed"  # selected by no rule: unrestricted


def test_allowed_traffic_is_the_union_of_rules() -> None:
    second = BILLING_HEAD.replace("name: p,", "name: q,") + (
        "  ingress: [{fromEndpoints: [{matchLabels: {app: dev-tool}}], toPorts: [{ports: [{port: '5432'}]}]}]\n"
    )
    plan = plan_of(BILLING_POLICY, second)
    assert flow(plan, "dev-tool", "billing-api", 5432) == "allowed"
    assert http(plan, "prometheus", "billing-api", path="/metrics") == "200"


def test_deny_wins_over_every_allow() -> None:
    deny = BILLING_HEAD.replace("name: p,", "name: deny,") + (
        "  ingressDeny: [{fromEndpoints: [{matchLabels: {app: prometheus}}], toPorts: [{ports: [{port: '8080'}]}]}]\n"
    )
    allow_all = BILLING_HEAD.replace("name: p,", "name: all,") + "  ingress: [{fromEntities: [all]}]\n"
    plan = plan_of(BILLING_POLICY, deny, allow_all)
    result = trace(plan, "prometheus", "billing-api", 8080, "TCP")
    assert (result.verdict, result.reason) == ("dropped", "Policy denied by denylist")
    assert http(plan, "finance-batch", "billing-api", path="/anything") == "200"  # the L3 allow-all shadows L7


def test_enable_default_deny_false_adds_allows_without_default_deny() -> None:
    soft = (
        BILLING_HEAD
        + "  enableDefaultDeny: {ingress: false}\n"
        + (
            "  ingress:\n  - fromEndpoints: [{matchLabels: {app: prometheus}}]\n"
            "    toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{method: GET, path: /metrics}]}}]\n"
        )
    )
    plan = plan_of(soft)
    # Nothing else selects billing-api: not in default deny, and its L7 rules may not deny anything.
    assert http(plan, "prometheus", "billing-api", method="POST", path="/x") == "200"
    assert http(plan, "dev-tool", "billing-api") == "200"
    # With another rule in default deny, its allows join the union.
    closed = BILLING_HEAD.replace("name: p,", "name: closed,") + "  ingress: []\n"
    plan = plan_of(soft, closed)
    assert http(plan, "prometheus", "billing-api", path="/metrics") == "200"
    assert http(plan, "prometheus", "billing-api", method="POST", path="/metrics") == "403"
    assert http(plan, "dev-tool", "billing-api") == "dropped"


def test_empty_rule_list_switches_default_deny_on_and_allows_nothing() -> None:
    text = BILLING_HEAD.replace("app: billing-api", "app: dev-tool") + "  egress: [{}]\n"
    plan = plan_of(text)
    assert flow(plan, "dev-tool", "billing-api", 8080) == "dropped"
    assert flow(plan, "dev-tool", INTERNET, 80) == "dropped"
    assert flow(plan, "prometheus", "billing-api", 8080) == "allowed"


def test_the_node_always_reaches_its_pods() -> None:
    plan = plan_of(BILLING_HEAD + "  ingress: []\n")
    assert flow(plan, NODE_IP, "billing-api", 8080) == "allowed"


# Peers


def test_peer_selector_namespace_implicit_and_explicit() -> None:
    plan = plan_of(BILLING_POLICY)
    assert http(plan, "monitoring/prometheus-mon", "billing-api", path="/metrics") == "dropped"
    explicit = BILLING_POLICY.replace(
        "{matchLabels: {app: prometheus}}",
        "{matchLabels: {app: prometheus, k8s:io.kubernetes.pod.namespace: monitoring}}",
    )
    plan = plan_of(explicit)
    assert http(plan, "monitoring/prometheus-mon", "billing-api", path="/metrics") == "200"
    assert http(plan, "prometheus", "billing-api", path="/metrics") == "dropped"


def test_match_expressions_and_derived_labels() -> None:
    text = billing("""
    - fromEndpoints:
      - matchExpressions:
        - {key: app, operator: In, values: [prometheus, dev-tool]}
        - {key: io.cilium.k8s.policy.cluster, operator: Exists}
        - {key: io.cilium.k8s.policy.serviceaccount, operator: NotIn, values: [batch]}
      toPorts: [{ports: [{port: "5432"}]}]
    - fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: batch}}]
      toPorts: [{ports: [{port: "8080"}]}]
    - fromEndpoints: [{matchExpressions: [{key: app, operator: DoesNotExist}]}]
      toPorts: [{ports: [{port: "53"}]}]
    """)
    plan = plan_of(text)
    assert flow(plan, "prometheus", "billing-api", 5432) == "allowed"
    assert flow(plan, "dev-tool", "billing-api", 5432) == "allowed"
    assert flow(plan, "finance-batch", "billing-api", 5432) == "dropped"
    assert flow(plan, "finance-batch", "billing-api", 8080) == "allowed"
    assert flow(plan, "prometheus", "billing-api", 53, "UDP") == "dropped"


def test_empty_endpoint_selector_means_the_namespace_or_the_cluster() -> None:
    text = billing("- fromEndpoints: [{}]\n  toPorts: [{ports: [{port: '5432'}]}]")
    plan = plan_of(text)
    assert flow(plan, "dev-tool", "billing-api", 5432) == "allowed"
    assert flow(plan, "monitoring/prometheus-mon", "billing-api", 5432) == "dropped"
    assert flow(plan, INTERNET, "billing-api", 5432) == "dropped"
    clusterwide = text.replace("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy").replace(
        "{name: p, namespace: production}", "{name: p}"
    )
    plan = plan_of(clusterwide)
    assert flow(plan, "monitoring/prometheus-mon", "billing-api", 5432) == "allowed"
    assert flow(plan, INTERNET, "billing-api", 5432) == "dropped"


def test_clusterwide_policy_selects_pods_of_every_namespace() -> None:
    text = """apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: prometheus-everywhere}
spec:
  endpointSelector: {matchLabels: {app: prometheus}}
  egress: [{}]
"""
    plan = plan_of(text)
    assert flow(plan, "prometheus", "billing-api", 8080) == "dropped"
    assert flow(plan, "monitoring/prometheus-mon", "billing-api", 8080) == "dropped"
    assert flow(plan, "dev-tool", "billing-api", 8080) == "allowed"


def test_cidr_rules_with_except_select_addresses_outside_the_pods() -> None:
    text = billing("""
    - fromCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.0/28]}]
      toPorts: [{ports: [{port: "8080"}]}]
    - fromCIDR: [10.244.0.0/16]
      toPorts: [{ports: [{port: "5432"}]}]
    """)
    plan = plan_of(text)
    assert flow(plan, "198.51.100.77", "billing-api", 8080) == "allowed"
    assert flow(plan, INTERNET, "billing-api", 8080) == "dropped"  # .10 is in the excepted /28
    # A CIDR covering the pod network does not select pods: they have identities of their own.
    assert flow(plan, "dev-tool", "billing-api", 5432) == "dropped"
    assert flow(plan, "10.244.200.1", "billing-api", 5432) == "allowed"
    egress = BILLING_HEAD + "  egress: [{toCIDR: [198.51.100.0/24], toPorts: [{ports: [{port: '80'}]}]}]\n"
    plan = plan_of(egress)
    assert flow(plan, "billing-api", INTERNET, 80) == "allowed"
    assert flow(plan, "billing-api", "203.0.113.1", 80) == "dropped"


def test_entities() -> None:
    def plan_for(entity: str) -> Plan:
        return plan_of(billing(f"- fromEntities: [{entity}]\n  toPorts: [{{ports: [{{port: '5432'}}]}}]"))

    world, cluster, everyone = plan_for("world"), plan_for("cluster"), plan_for("all")
    assert flow(world, INTERNET, "billing-api", 5432) == "allowed"
    assert flow(world, "dev-tool", "billing-api", 5432) == "dropped"
    assert flow(cluster, "monitoring/prometheus-mon", "billing-api", 5432) == "allowed"
    assert flow(cluster, INTERNET, "billing-api", 5432) == "dropped"
    assert flow(everyone, INTERNET, "billing-api", 5432) == "allowed"
    assert flow(everyone, "dev-tool", "billing-api", 5432) == "allowed"
    egress_host = BILLING_HEAD + "  egress: [{toEntities: [host]}]\n"
    plan = plan_of(egress_host)
    assert flow(plan, "billing-api", NODE_IP, 10250) == "allowed"
    assert flow(plan, "billing-api", "dev-tool", 80) == "dropped"


def test_no_peer_field_means_any_peer() -> None:
    plan = plan_of(billing("- toPorts: [{ports: [{port: '5432', protocol: TCP}]}]"))
    for source in ("dev-tool", "monitoring/prometheus-mon", INTERNET):
        assert flow(plan, source, "billing-api", 5432) == "allowed"
        assert flow(plan, source, "billing-api", 5433) == "dropped"


def test_identical_labels_share_one_identity() -> None:
    plan = plan_of(BILLING_POLICY)
    assert plan.endpoint("prometheus").identity != plan.endpoint("monitoring/prometheus-mon").identity  # type: ignore[union-attr]
    assert len({e.identity for e in plan.endpoints}) == len(plan.endpoints)


# Ports


def test_named_ports_resolve_per_pod() -> None:
    ingress = BILLING_HEAD.replace("app: billing-api", "tier: backend") + (
        "  ingress: [{fromEndpoints: [{matchLabels: {app: dev-tool}}], toPorts: [{ports: [{port: http, protocol: TCP}]}]}]\n"
    )
    plan = plan_of(ingress)
    assert flow(plan, "dev-tool", "billing-api", 8080) == "allowed"
    assert flow(plan, "dev-tool", "other-api", 9090) == "allowed"
    assert flow(plan, "dev-tool", "other-api", 8080) == "dropped"
    egress = BILLING_HEAD.replace("app: billing-api", "app: dev-tool") + (
        "  egress: [{toEndpoints: [{matchLabels: {tier: backend}}], toPorts: [{ports: [{port: http, protocol: TCP}],"
        " rules: {http: [{method: GET}]}}]}]\n"
    )
    plan = plan_of(egress)
    assert http(plan, "dev-tool", "other-api", port=9090) == "200"
    assert http(plan, "dev-tool", "other-api", port=9090, method="PUT") == "403"
    assert http(plan, "dev-tool", "billing-api", port=9090) == "dropped"


def test_port_ranges_with_and_without_l7() -> None:
    plan = plan_of(
        billing("""
    - toPorts:
      - ports: [{port: "5000", endPort: 5500, protocol: TCP}]
      - ports: [{port: "8000", endPort: 8191, protocol: TCP}]
        rules: {http: [{method: GET}]}
    """)
    )
    assert flow(plan, "dev-tool", "billing-api", 5432) == "allowed"
    assert flow(plan, "dev-tool", "billing-api", 5501) == "dropped"
    assert http(plan, "dev-tool", "billing-api", port=8080) == "200"
    assert http(plan, "dev-tool", "billing-api", port=8080, method="POST") == "403"
    assert http(plan, "dev-tool", "billing-api", port=8192) == "dropped"


def test_protocols() -> None:
    plan = plan_of(
        billing("""
    - toPorts: [{ports: [{port: "53", protocol: UDP}]}]
    - toPorts: [{ports: [{port: "5432", protocol: ANY}]}]
    """)
    )
    assert flow(plan, "dev-tool", "billing-api", 53, "UDP") == "allowed"
    assert flow(plan, "dev-tool", "billing-api", 53, "TCP") == "dropped"
    assert flow(plan, "dev-tool", "billing-api", 5432, "UDP") == "allowed"
    assert flow(plan, "dev-tool", "billing-api", 5432, "TCP") == "allowed"


# L7 HTTP rules


def test_method_path_host_are_full_matches_and_methods_case_sensitive() -> None:
    plan = plan_of(
        billing("""
    - toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{method: "GET|HEAD", path: "/status", host: "api(:8080)?"}]}
    """)
    )
    assert http(plan, "dev-tool", "billing-api", path="/status", host="api:8080") == "200"
    assert http(plan, "dev-tool", "billing-api", method="HEAD", path="/status", host="api") == "200"
    assert http(plan, "dev-tool", "billing-api", path="/status/", host="api") == "403"
    assert http(plan, "dev-tool", "billing-api", path="/status/1", host="api") == "403"
    assert http(plan, "dev-tool", "billing-api", path="/status", host="apix") == "403"
    assert http(plan, "dev-tool", "billing-api", method="get", path="/status", host="api") == "403"


def test_headers_presence_and_exact_value_and_or_across_rules() -> None:
    plan = plan_of(
        billing("""
    - toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules:
          http:
          - {method: GET, path: /private, headers: ["X-Very-Secret-Token: 42", X-Present]}
          - {method: GET, path: /public}
    """)
    )
    token, present = ("X-Very-Secret-Token", "42"), ("X-Present", "")
    assert http(plan, "dev-tool", "billing-api", path="/private", headers=(token, present)) == "200"
    assert http(plan, "dev-tool", "billing-api", path="/private", headers=(token,)) == "403"
    assert (
        http(plan, "dev-tool", "billing-api", path="/private", headers=(("X-Very-Secret-Token", "4"), present)) == "403"
    )
    assert http(plan, "dev-tool", "billing-api", path="/public") == "200"
    assert http(plan, "dev-tool", "billing-api", path="/private") == "403"


def test_header_matches_and_mismatch_actions() -> None:
    secret = """---
apiVersion: v1
kind: Secret
metadata: {name: token, namespace: production}
stringData: {value: "Bearer 123456"}
"""
    plan = plan_of(
        billing("""
    - toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules:
          http:
          - path: /strict
            headerMatches: [{name: X-Team, value: billing}]
          - path: /replace
            headerMatches: [{name: Authorization, mismatch: REPLACE, secret: {namespace: production, name: token}}]
          - path: /add
            headerMatches: [{name: X-Tag, value: sidecarless, mismatch: ADD}]
          - path: /delete
            headerMatches: [{name: X-Debug, value: "on", mismatch: DELETE}]
          - path: /log
            headerMatches: [{name: X-Team, value: billing, mismatch: LOG}]
    """)
        + secret
    )

    def backend(path: str, *headers: tuple[str, str]) -> dict[str, str] | None:
        result = trace(plan, "dev-tool", "billing-api", 8080, "TCP", Request("GET", path, None, headers))
        if result.status != 200:
            return None
        return dict(result.backend_headers or ())

    assert backend("/strict", ("X-Team", "billing")) is not None
    assert backend("/strict", ("X-Team", "other")) is None
    assert backend("/replace")["authorization"] == "Bearer 123456"  # type: ignore[index]
    assert backend("/replace", ("Authorization", "Bearer wrong"))["authorization"] == "Bearer 123456"  # type: ignore[index]
    tags = trace(plan, "dev-tool", "billing-api", 8080, "TCP", Request("GET", "/add", None, (("X-Tag", "x"),)))
    assert [v for k, v in tags.backend_headers or () if k == "x-tag"] == ["x", "sidecarless"]
    assert "x-debug" not in backend("/delete", ("X-Debug", "off"))  # type: ignore[operator]
    assert backend("/delete", ("X-Debug", "on"))["x-debug"] == "on"  # type: ignore[index]
    assert backend("/log", ("X-Team", "other"))["x-team"] == "other"  # type: ignore[index]


def test_missing_secret_fails_closed_and_is_reported() -> None:
    plan = plan_of(
        billing("""
    - toPorts:
      - ports: [{port: "8080", protocol: TCP}]
        rules: {http: [{headerMatches: [{name: Authorization, mismatch: REPLACE, secret: {namespace: production, name: nope}}]}]}
    """)
    )
    assert plan.problems and "production/nope" in plan.problems[0]
    assert http(plan, "dev-tool", "billing-api") == "dropped"


def test_empty_http_rule_allows_everything_through_the_proxy() -> None:
    plan = plan_of(billing("- toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{}]}}]"))
    result = trace(plan, "dev-tool", "billing-api", 8080, "TCP", Request("DELETE", "/anything"))
    assert (result.status, result.proxied) == (200, ("ingress",))


def test_l4_and_l3_allows_shadow_l7_rules_for_the_same_peer() -> None:
    l4 = billing("""
    - fromEndpoints: [{matchLabels: {app: prometheus}}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    """)
    l3 = billing("- fromEndpoints: [{matchLabels: {app: finance-batch}}]")
    plan = plan_of(BILLING_POLICY, l4.replace("name: p,", "name: l4,"), l3.replace("name: p,", "name: l3,"))
    for source in ("prometheus", "finance-batch"):
        result = trace(plan, source, "billing-api", 8080, "TCP", Request("DELETE", "/anything"))
        assert (result.verdict, result.proxied) == ("allowed", ())
    assert http(plan, "dev-tool", "billing-api", path="/metrics") == "dropped"


def test_escaped_slashes_are_rejected_and_query_is_not_matched() -> None:
    plan = plan_of(BILLING_POLICY)
    assert http(plan, "prometheus", "billing-api", path="/metrics%2F..%2Fadmin") == "400"
    assert http(plan, "prometheus", "billing-api", path="/%6Detrics") == "200"  # %6D is m, unreserved
    assert http(plan, "prometheus", "billing-api", path="/metrics?/api/v1/invoices/export") == "200"
    assert http(plan, "prometheus", "billing-api", path="/api/v1/invoices/export?/metrics") == "403"


def test_egress_and_ingress_l7_both_apply() -> None:
    egress = BILLING_HEAD.replace("app: billing-api", "app: prometheus").replace("name: p,", "name: e,") + (
        "  egress:\n  - toEndpoints: [{matchLabels: {app: billing-api}}]\n"
        "    toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{path: '/metrics.*'}]}}]\n"
    )
    plan = plan_of(BILLING_POLICY, egress)
    result = trace(plan, "prometheus", "billing-api", 8080, "TCP", Request("GET", "/metrics"))
    assert (result.status, result.proxied) == (200, ("egress", "ingress"))
    assert http(plan, "prometheus", "billing-api", method="POST", path="/metrics") == "403"  # ingress says no
    assert http(plan, "prometheus", "billing-api", path="/metricsx") == "403"  # ingress says no
    assert http(plan, "prometheus", "other-api", port=9090) == "dropped"  # egress default deny


def test_a_pod_always_reaches_itself() -> None:
    plan = plan_of(BILLING_HEAD + "  ingress: []\n  egress: []\n")
    assert flow(plan, "billing-api", "billing-api", 8080) == "allowed"


def test_sctp_and_icmp() -> None:
    plan = plan_of(
        billing("""
    - toPorts: [{ports: [{port: "5432", protocol: ANY}]}]
    - fromEndpoints: [{matchLabels: {app: prometheus}}]
    """)
    )
    assert flow(plan, "dev-tool", "billing-api", 5432, "SCTP") == "allowed"
    assert flow(plan, "dev-tool", "billing-api", 0, "ICMP") == "dropped"  # a port rule allows no ICMP
    assert flow(plan, "prometheus", "billing-api", 0, "ICMP") == "allowed"  # an L3 rule does


def test_pods_with_identical_labels_share_an_identity() -> None:
    pods = parse_pods(
        "pods.yaml",
        "pods:\n- {name: a, namespace: x, labels: {app: w}}\n- {name: b, namespace: x, labels: {app: w}}\n",
    )
    plan = compile_plan([], endpoints_of(place(pods)), Node(ips=(NODE_IP,)))
    first, second = plan.endpoints
    assert first.identity == second.identity


def test_pods_of_other_nodes_have_identities_but_no_policy_here() -> None:
    """Kubernetes mode: a pod on another node is a peer rules can name (its address maps to its labels'
    identity) but gets no policy of its own on this node."""
    pods = endpoints_of(place(parse_pods("pods.yaml", PODS)))
    remote = [replace(e, local=False, interface="") if e.name == "prometheus" else e for e in pods]
    policy = parse_policy_file("p.yaml", BILLING_POLICY).policies
    plan = compile_plan(policy, remote, Node(ips=(NODE_IP,)))
    assert plan.endpoint("production/prometheus") is None  # no policy of its own here
    prometheus = next(e for e in remote if e.name == "prometheus")
    identity = dict(plan.ipcache)[f"{prometheus.ip}/32"]
    billing_api = plan.endpoint("production/billing-api")
    assert billing_api is not None
    entry = billing_api.ingress.verdict(identity, "TCP", 8080)
    assert entry is not None and entry.action == "redirect", entry
    other = next(e for e in remote if e.name == "dev-tool")
    assert billing_api.ingress.verdict(dict(plan.ipcache)[f"{other.ip}/32"], "TCP", 8080) is None
