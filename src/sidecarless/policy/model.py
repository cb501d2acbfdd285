"""What the compiler takes in, as frozen values: the validated policy model (what a CiliumNetworkPolicy
means) and the pods and node it applies to (Endpoint, Node). Pure.

schema.py builds the policies from YAML, sources/ the pods; compile.py turns them into a Plan. Label keys are
stored without their `k8s:`/`any:` source prefix (they mean the same with or without it); `reserved:` keys are
kept as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
DEFAULT_CLUSTER_NAME = "default"

CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"

INGRESS = "ingress"
EGRESS = "egress"
DIRECTIONS = (INGRESS, EGRESS)

# Entities Cilium defines. `all` is every peer; the others are groups of identities (compile.py).
ENTITIES = (
    "all",
    "world",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "health",
    "init",
    "unmanaged",
    "ingress",
)
MISMATCH_ACTIONS = ("LOG", "ADD", "DELETE", "REPLACE")
ALL_PORTS = (0, 65535)


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # NotIn, as Kubernetes defines it


@dataclass(frozen=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.match_labels) and all(
            requirement.matches(labels) for requirement in self.match_expressions
        )

    def constrains(self, key: str) -> bool:
        return any(k == key for k, _ in self.match_labels) or any(r.key == key for r in self.match_expressions)


@dataclass(frozen=True)
class CidrRule:
    cidr: str  # normalised network, e.g. 10.0.0.0/8
    excepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Peers:
    """Who a rule item is about. All fields None: any peer (an item without peer fields). A field that is
    present selects the union of what it names; several fields are a union too."""

    endpoints: tuple[LabelSelector, ...] | None = None
    cidrs: tuple[CidrRule, ...] | None = None
    entities: tuple[str, ...] | None = None

    @property
    def any_peer(self) -> bool:
        return self.endpoints is None and self.cidrs is None and self.entities is None


@dataclass(frozen=True)
class PortProtocol:
    port: int  # 0 = every port (with end_port 65535)
    end_port: int
    protocol: str  # TCP, UDP, SCTP, ANY
    name: str | None = None  # a named port, resolved per pod; port/end_port unused then

    @property
    def all_ports(self) -> bool:
        return self.name is None and (self.port, self.end_port) == ALL_PORTS


@dataclass(frozen=True)
class SecretRef:
    namespace: str
    name: str


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    value: str | None  # None: the value comes from `secret`
    secret: SecretRef | None
    mismatch: str | None  # None: a mismatch denies; else LOG, ADD, DELETE, REPLACE


@dataclass(frozen=True)
class HeaderValue:
    """A header condition with its value resolved (a Secret's value filled in by compile.py)."""

    name: str  # lower case
    value: str | None  # None: the header must be present, any value
    mismatch: str | None = None
    from_secret: bool = False  # its value is a Secret's: never logged


@dataclass(frozen=True)
class HttpRule:
    """All given fields must match (method, path, host: RE2 full match); None matches anything."""

    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: tuple[HeaderValue, ...] = ()  # `headers` and resolved `headerMatches`, in order
    header_matches: tuple[HeaderMatch, ...] = ()  # as written; compile.py resolves them into `headers`
    # Where it is written ("ns/p spec.ingress[0].toPorts[0].rules.http[1]"; compile.py): what its hits count
    # under. Not part of what the rule matches: two equal rules are one.
    origin: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class PortRule:
    ports: tuple[PortProtocol, ...]  # empty: every port, every protocol
    http: tuple[HttpRule, ...] | None  # None: no L7 rules


@dataclass(frozen=True)
class RuleItem:
    peers: Peers
    to_ports: tuple[PortRule, ...]  # empty: every port (an L3 rule)


@dataclass(frozen=True)
class Rule:
    """One spec: what it selects and its four sections (None = section absent)."""

    endpoint_selector: LabelSelector
    ingress: tuple[RuleItem, ...] | None = None
    ingress_deny: tuple[RuleItem, ...] | None = None
    egress: tuple[RuleItem, ...] | None = None
    egress_deny: tuple[RuleItem, ...] | None = None
    default_deny_ingress: bool = True
    default_deny_egress: bool = True

    def section(self, direction: str, deny: bool) -> tuple[RuleItem, ...] | None:
        if direction == INGRESS:
            return self.ingress_deny if deny else self.ingress
        return self.egress_deny if deny else self.egress

    def default_deny(self, direction: str) -> bool:
        return self.default_deny_ingress if direction == INGRESS else self.default_deny_egress


@dataclass(frozen=True)
class Policy:
    kind: str  # CNP or CCNP
    name: str
    namespace: str | None  # None for a clusterwide policy
    file: str
    line: int
    rules: tuple[Rule, ...]
    audit: bool = False  # policy.sidecarless.io/audit: "true": its verdicts are reported, not enforced

    @functools.cached_property  # sorted by and compared for every policy at every change
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace is not None else self.name


SECTION_NAMES = {(INGRESS, False): "ingress", (INGRESS, True): "ingressDeny", (EGRESS, False): "egress",
                 (EGRESS, True): "egressDeny"}  # fmt: skip


def item_position(policy: Policy, rule_index: int, direction: str, deny: bool, item_index: int) -> str:
    """A rule item named as an operator finds it: "shop/cart spec.ingress[0]" ("specs[i]" with several)."""
    spec = "spec" if len(policy.rules) == 1 else f"specs[{rule_index}]"
    return f"{policy.key} {spec}.{SECTION_NAMES[(direction, deny)]}[{item_index}]"


def rule_positions(policy: Policy) -> list[tuple[str, bool]]:
    """Every rule of a policy, by position, in order: (position, is an HTTP rule). Rule items, and each HTTP
    rule of their ports ("...toPorts[0].rules.http[1]"; "...rules.http" for `http: []`, every request)."""
    positions = []
    for rule_index, rule in enumerate(policy.rules):
        for direction in (INGRESS, EGRESS):
            for deny in (False, True):
                for item_index, item in enumerate(rule.section(direction, deny) or ()):
                    position = item_position(policy, rule_index, direction, deny, item_index)
                    positions.append((position, False))
                    for port_index, port_rule in enumerate(item.to_ports):
                        if port_rule.http is None:
                            continue
                        rules_at = f"{position}.toPorts[{port_index}].rules.http"
                        positions += [(f"{rules_at}[{i}]", True) for i in range(len(port_rule.http))] or [
                            (rules_at, True)
                        ]
    return positions


@dataclass(frozen=True)
class Secret:
    namespace: str
    name: str
    data: tuple[tuple[str, str], ...]  # key -> decoded value
    file: str
    line: int

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def value(self) -> str | None:
        """The header value a headerMatch takes: the only key's value, or the key `value`."""
        values = dict(self.data)
        if len(values) == 1:
            return next(iter(values.values()))
        return values.get("value")


def strip_label_source(key: str) -> str:
    for prefix in ("k8s:", "any:"):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


# The pods and the node, as the sources report them.
Labels = tuple[tuple[str, str], ...]


def host_prefix(ip: str) -> str:
    """One address as a prefix of its family's full length."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


@dataclass(frozen=True)
class NamedPort:
    name: str
    port: int
    protocol: str  # TCP or UDP


@dataclass(frozen=True)
class Endpoint:
    """A pod: what labels it carries and, on this node, where its traffic enters the node. Pods of other nodes
    (`local` false) get identities, so rules can name them as peers, but no policy of their own here."""

    name: str
    namespace: str
    labels: Labels
    ip: str  # IPv4; "" for an IPv6-only pod
    interface: str  # "" for a pod of another node
    service_account: str = "default"
    named_ports: tuple[NamedPort, ...] = ()
    local: bool = True
    ip6: str = ""  # IPv6; "" for an IPv4-only pod

    @functools.cached_property  # 100,000 pods sorted and indexed by it
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ips(self) -> tuple[str, ...]:
        """The pod's addresses, IPv4 first."""
        return tuple(ip for ip in (self.ip, self.ip6) if ip)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Its addresses as prefixes: /32 and /128."""
        return tuple(host_prefix(ip) for ip in self.ips)


@dataclass(frozen=True)
class Node:
    """What compile needs to know of the node: its addresses (the host identity), the other nodes' addresses
    (the remote-node identity) and the cluster name."""

    ips: tuple[str, ...] = ()
    cluster_name: str = DEFAULT_CLUSTER_NAME
    remote_ips: tuple[str, ...] = ()  # every address of every other node of the cluster


NO_NODE = Node()  # a node with no addresses of its own, in the default cluster


def enforced_policies(policies: Iterable[Policy]) -> tuple[Policy, ...]:
    """What the datapath and Envoy enforce: every policy not in audit mode. The audit verdict is that of all."""
    return tuple(policy for policy in policies if not policy.audit)
