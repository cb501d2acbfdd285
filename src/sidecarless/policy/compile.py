"""Policies + endpoints -> Plan: per pod and direction, who may reach which ports, and what goes to the proxy.

Pure and deterministic: the same input gives an equal Plan (sorted tuples throughout), so everything rendered
from it is byte-identical and its versions are content hashes.

The semantics (POLICY.md):
- a pod selected by a rule with a section for a direction is in default deny for that direction (unless
  every such rule says `enableDefaultDeny: false`); allowed traffic is the union of all allows;
- deny rules win over every allow;
- an L3/L4 allow for a peer and port shadows L7 rules for that peer and port (the peer goes through
  untouched); L7 rules from several rules are ORed;
- peers are identities: pods share one when their labels are equal; CIDRs and entities are identities too.

One pod's compile is grants.py; this module finds the pods each policy selects, works out the identities and
addresses, and remembers what it compiled (Compiler).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from sidecarless.policy.grants import CompileContext, compile_endpoint, local_by_label, selected_pods
from sidecarless.policy.identity import (
    AddressSet,
    Identity,
    allocate_identities,
    build_ipcache,
    cidr_prefixes,
    identity_addresses,
)
from sidecarless.policy.model import (
    NO_NODE,
    Endpoint,
    Node,
    Policy,
    Secret,
)
from sidecarless.policy.plan import EndpointPolicy, Plan

_Value = TypeVar("_Value")
# Values worked out from one policy object, by id() and checked to be that object: an unchanged policy is
# the same object from one update to the next (sources/source.py LastGoodPolicies), so a change to one of
# 20,000 policies works out one policy's values, not 20,000.
_PerPolicy = dict[int, tuple[Policy, _Value]]


def _per_policy(
    policies: Iterable[Policy], previous: _PerPolicy[_Value], work_out: Callable[[Policy], _Value]
) -> _PerPolicy[_Value]:
    """Each policy's value, from `previous` where it holds that very object; only these policies are kept."""
    values: _PerPolicy[_Value] = {}
    for policy in policies:
        known = previous.get(id(policy))
        values[id(policy)] = known if known is not None and known[0] is policy else (policy, work_out(policy))
    return values


def compile_plan(
    policies: Iterable[Policy],
    endpoints: Iterable[Endpoint],
    node: Node = NO_NODE,
    secrets: Iterable[Secret] = (),
    population_policies: Iterable[Policy] | None = None,
) -> Plan:
    return Compiler().compile(policies, endpoints, node, secrets, population_policies)


@dataclass(frozen=True)
class _Population:
    """What depends on the pods, the node and the policies' CIDR prefixes alone: identities and addresses.
    A policy change leaves it as it is."""

    key: tuple[list[Endpoint], Node, frozenset[str]]
    context: CompileContext
    local: list[Endpoint]  # this node's pods
    local_by_label: dict[tuple[str, str], list[Endpoint]]
    identities: tuple[Identity, ...]
    ipcache: tuple[tuple[str, int], ...]
    addresses: tuple[tuple[int, AddressSet], ...]
    remote_pods: tuple[tuple[str, str], ...]  # address -> key of other nodes' pods


@dataclass(frozen=True)
class _CompiledEndpoint:
    selecting: tuple[Policy, ...]  # the policies it was compiled from
    policy: EndpointPolicy
    problems: tuple[str, ...]


class Compiler:
    """compile_plan with a memory of the previous compile, for an agent that compiles after every change: a
    policy change recompiles only the pods whose selecting policies changed, and reuses the identities and
    addresses (10,000 pods' worth) while no pod, node address or CIDR prefix changed. Unchanged parts of the
    result are the previous objects, which lets rendering skip them too. Same result as a fresh compile."""

    def __init__(self) -> None:
        self._population: _Population | None = None
        self._endpoints: dict[str, _CompiledEndpoint] = {}
        self._sorted_endpoints: tuple[tuple[Endpoint, ...], list[Endpoint]] | None = None
        self._prefixes: _PerPolicy[frozenset[str]] = {}
        self._selected: _PerPolicy[frozenset[str]] = {}  # for this population

    def compile(
        self,
        policies: Iterable[Policy],
        endpoints: Iterable[Endpoint],
        node: Node = NO_NODE,
        secrets: Iterable[Secret] = (),
        population_policies: Iterable[Policy] | None = None,
    ) -> Plan:
        """`population_policies`: whose CIDR prefixes make the identities and the ipcache (default: `policies`).
        The enforced plan takes those of every policy, audited ones included, so that it and the audit plan
        number identities alike; a rule for 10.0.0.0/8 still selects the same addresses when an audited
        10.1.0.0/16 splits its identity in two."""
        # The same tuple of 100,000 pods (a policy change) is not sorted again; a list could have changed inside.
        if isinstance(endpoints, tuple) and self._sorted_endpoints and self._sorted_endpoints[0] is endpoints:
            endpoint_list = self._sorted_endpoints[1]
        else:
            endpoint_list = sorted(endpoints, key=lambda endpoint: endpoint.key)
            self._sorted_endpoints = (endpoints, endpoint_list) if isinstance(endpoints, tuple) else None
        policy_list = sorted(policies, key=lambda policy: (policy.key, policy.file))
        self._prefixes = _per_policy(
            policy_list if population_policies is None else population_policies,
            self._prefixes,
            lambda policy: frozenset(cidr_prefixes([policy])),
        )
        prefixes = frozenset[str]().union(*(value for _, value in self._prefixes.values()))
        # Lists compare item by item with an identity shortcut: unchanged pods cost a pointer comparison each.
        key = (endpoint_list, node, prefixes)
        secrets_by_key = {secret.key: secret for secret in secrets}
        population = self._population
        if population is None or population.key != key or population.context.secrets != secrets_by_key:
            population = self._population = _population(key, secrets_by_key)
            self._endpoints, self._selected = {}, {}
        context = population.context

        local, by_label = population.local, population.local_by_label
        self._selected = _per_policy(
            policy_list, self._selected, lambda policy: selected_pods(policy, local, by_label, context)
        )
        selecting_by_endpoint: dict[str, list[Policy]] = {endpoint.key: [] for endpoint in local}
        for policy in policy_list:  # in order
            for endpoint_key in self._selected[id(policy)][1]:
                selecting_by_endpoint[endpoint_key].append(policy)
        compiled: dict[str, _CompiledEndpoint] = {}
        for endpoint in local:
            selecting = tuple(selecting_by_endpoint[endpoint.key])
            previous = self._endpoints.get(endpoint.key)
            if previous is None or previous.selecting != selecting:
                context.problems = []
                compiled_policy = compile_endpoint(endpoint, selecting, context)
                previous = _CompiledEndpoint(selecting, compiled_policy, tuple(context.problems))
            compiled[endpoint.key] = previous
        self._endpoints = compiled
        return Plan(
            identities=population.identities,
            endpoints=tuple(entry.policy for entry in compiled.values()),
            ipcache=population.ipcache,
            addresses=population.addresses,
            problems=tuple(sorted({problem for entry in compiled.values() for problem in entry.problems})),
            remote_pods=population.remote_pods,
        )


def _population(key: tuple[list[Endpoint], Node, frozenset[str]], secrets: dict[str, Secret]) -> _Population:
    endpoint_list, node, prefixes = key
    identities, endpoint_identity = allocate_identities(endpoint_list, node, set(prefixes))
    ipcache = build_ipcache(identities, endpoint_list, endpoint_identity, node)
    context = CompileContext(identities, endpoint_list, endpoint_identity, secrets)
    local = [endpoint for endpoint in endpoint_list if endpoint.local]
    return _Population(
        key=key,
        context=context,
        local=local,
        local_by_label=local_by_label(local, context),
        identities=tuple(sorted(identities, key=lambda identity: identity.number)),
        ipcache=tuple(sorted(ipcache.items())),
        addresses=tuple(sorted(identity_addresses(identities, ipcache).items())),
        remote_pods=tuple(sorted((ip, e.key) for e in endpoint_list if not e.local for ip in e.ips)),
    )
