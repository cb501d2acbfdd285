"""Which identities a rule's peer fields select: endpoint selectors, CIDRs (with `except`), entities. Pure."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from sidecarless.policy.identity import RESERVED, WORLD_IDENTITIES, WORLD_IPV6_IDENTITY, WORLD_PREFIXES, Identity
from sidecarless.policy.model import (
    NAMESPACE_LABEL,
    CidrRule,
    Labels,
    LabelSelector,
    Peers,
)

PodsByLabel = Mapping[tuple[str, str], list[Identity]]


def pods_by_label(identities: list[Identity]) -> dict[tuple[str, str], list[Identity]]:
    """The pod identities carrying each label: a selector with matchLabels is tried only on those carrying its
    first label (20,000 policies over 10,000 identities: 80 s of selector matching without it)."""
    index: dict[tuple[str, str], list[Identity]] = defaultdict(list)
    for identity in identities:
        if identity.kind == "pod":
            for pair in identity.labels:
                index[pair].append(identity)
    return index


def select_peers(
    peers: Peers, namespace: str | None, identities: list[Identity], pods_indexed: PodsByLabel | None = None
) -> frozenset[int] | None:
    """The identities a rule item's peer fields select; None: every peer. `pods_indexed`: pods_by_label(identities)."""
    if peers.any_peer:
        return None
    selected: set[int] = set()
    for selector in peers.endpoints or ():
        if pods_indexed is not None and selector.match_labels:
            candidates = pods_indexed.get(selector.match_labels[0], [])
        else:
            candidates = [i for i in identities if i.kind == "pod"]
        selected.update(i.number for i in candidates if selects(selector, namespace, i.labels))
    if peers.cidrs:
        by_label: dict[str, list[Identity]] = defaultdict(list)
        for identity in identities:
            if identity.kind == "cidr":
                for label, _ in identity.labels:
                    by_label[label].append(identity)
        for cidr in peers.cidrs:
            selected.update(select_cidr(cidr, identities, by_label))
    for entity in peers.entities or ():
        if entity == "all":
            return None
        selected.update(select_entity(entity, identities))
    return frozenset(selected)


def selects(selector: LabelSelector, namespace: str | None, labels: Labels) -> bool:
    """A peer selector over pod labels; in a namespaced policy, without a namespace label it means the
    policy's namespace."""
    label_map = dict(labels)
    if (
        namespace is not None
        and not selector.constrains(NAMESPACE_LABEL)
        and label_map.get(NAMESPACE_LABEL) != namespace
    ):
        return False
    return selector.matches(label_map)


def select_cidr(cidr: CidrRule, identities: list[Identity], by_label: Mapping[str, list[Identity]]) -> set[int]:
    """`by_label`: the CIDR identities carrying each `cidr:` label."""
    excepted = {f"cidr:{prefix}" for prefix in cidr.excepts}
    world = WORLD_PREFIXES.get(cidr.cidr)
    if world is not None:
        # The whole family: its world identity and every CIDR identity of that family.
        ipv6 = world == WORLD_IPV6_IDENTITY
        candidates = [i for i in identities if i.kind == "cidr" and (":" in (i.prefix or "")) == ipv6]
        selected = {world}
    else:
        candidates = by_label.get(f"cidr:{cidr.cidr}", [])
        selected = set()
    return selected | {i.number for i in candidates if not excepted.intersection(label for label, _ in i.labels)}


def select_entity(entity: str, identities: list[Identity]) -> set[int]:
    if entity == "world":
        return set(WORLD_IDENTITIES) | {i.number for i in identities if i.kind == "cidr"}
    if entity == "cluster":
        return {i.number for i in identities if i.kind == "pod"} | (set(RESERVED) - WORLD_IDENTITIES)
    number = next(n for n, name in RESERVED.items() if name == entity)
    return {number}
