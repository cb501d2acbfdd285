"""The peer selector index (issue 19: 20,000 policies over 10,000 identities took 80 s of selector matching) selects
exactly what trying every pod identity selects: matchLabels, matchExpressions, namespace labels, several
selectors in one item, a label no pod carries, and the empty selector."""

from sidecarless.policy.identity import allocate_identities
from sidecarless.policy.model import Node
from sidecarless.policy.schema import parse_policy_bytes
from sidecarless.policy.selectors import pods_by_label, select_peers
from sidecarless.sources.kubernetes import pod_endpoint

POLICY = b"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: peers, namespace: shop}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
  - fromEndpoints: [{matchLabels: {app: web, tier: front}}, {matchLabels: {app: db}}]
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: billing, app: api}}]
  - fromEndpoints: [{matchLabels: {app: nowhere}}]
  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [web, api]}]}]
  - fromEndpoints: [{matchLabels: {tier: front}, matchExpressions: [{key: app, operator: NotIn, values: [web]}]}]
  - fromEndpoints: [{}]
"""


def test_the_index_selects_what_trying_every_identity_selects() -> None:
    pods = [
        ("shop", "web", "front"), ("shop", "web", "back"), ("shop", "db", "back"), ("shop", "api", "front"),
        ("billing", "api", "front"), ("billing", "web", "front"), ("other", "db", "back"),
    ]  # fmt: skip
    endpoints = []
    for index, (namespace, app, tier) in enumerate(pods):
        pod = {
            "metadata": {"name": f"p{index}", "namespace": namespace, "labels": {"app": app, "tier": tier}},
            "spec": {"nodeName": "n"},
            "status": {"podIP": f"10.0.0.{index + 1}"},
        }
        endpoint = pod_endpoint(pod, {}, "", local=False)
        assert endpoint is not None
        endpoints.append(endpoint)
    identities, _ = allocate_identities(endpoints, Node(), set())
    index = pods_by_label(identities)
    (policy,) = parse_policy_bytes("peers.yaml", POLICY).policies
    items = [item for rule in policy.rules for item in rule.section("ingress", False) or ()]
    assert len(items) == 7
    chosen = []
    for item in items:
        plain = select_peers(item.peers, policy.namespace, identities)
        assert select_peers(item.peers, policy.namespace, identities, index) == plain, item
        chosen.append(len(plain or ()))
    # shop: web x2; web-front and db; billing: api; none; web x2 and api; api (front, not web); all 4 of shop
    assert chosen == [2, 2, 1, 0, 3, 1, 4], chosen
