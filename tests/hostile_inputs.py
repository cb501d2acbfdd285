"""Valid but hostile policy input, generated: shared by the unit tests, the lab tests and the benchmark."""

from __future__ import annotations

ALIAS_BOMB = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bomb
  namespace: production
  annotations:
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
spec:
  endpointSelector: {matchLabels: {app: billing-api}}
  ingress: [{}]
"""


def many_prefixes(count: int, name: str = "many-prefixes") -> str:
    """billing-api's GET /metrics from `count` /32 prefixes (172.16.0.0 onwards)."""
    lines = [
        "apiVersion: cilium.io/v2",
        "kind: CiliumNetworkPolicy",
        f"metadata: {{name: {name}, namespace: production}}",
        "spec:",
        "  endpointSelector: {matchLabels: {app: billing-api}}",
        "  ingress:",
        "  - fromEndpoints: [{matchLabels: {app: prometheus}}]",
        "    toPorts:",
        '    - ports: [{port: "8080", protocol: TCP}]',
        "      rules: {http: [{method: GET, path: /metrics}]}",
        "  - fromCIDR:",
        *(f"    - 172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}/32" for i in range(count)),
        "    toPorts:",
        '    - ports: [{port: "8080", protocol: TCP}]',
        "      rules: {http: [{method: GET, path: /metrics}]}",
    ]
    return "\n".join(lines) + "\n"


def too_many_entries() -> str:
    """A valid policy whose kernel entries overflow the default policy map (262,144): 60 /32 prefixes x 160
    port ranges, protocol ANY (TCP, UDP and SCTP): 302,400 entries for billing-api."""
    lines = [
        "apiVersion: cilium.io/v2",
        "kind: CiliumNetworkPolicy",
        "metadata: {name: too-big, namespace: production}",
        "spec:",
        "  endpointSelector: {matchLabels: {app: billing-api}}",
        "  ingress:",
        "  - fromCIDR:",
        *(f"    - 192.0.2.{i}/32" for i in range(60)),
        "    toPorts:",
    ]
    for item in range(4):
        starts = [1 + (item * 40 + k) * 400 for k in range(40)]
        ports = ", ".join(f'{{port: "{start}", endPort: {start + 394}}}' for start in starts)
        lines.append(f"    - ports: [{ports}]")
    return "\n".join(lines) + "\n"
