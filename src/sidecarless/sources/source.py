"""What every policy and endpoint source gives the agent, and the last-good rule they share.

A source is an async iterator of updates: a new policy set, a new view of the node, or both. A policy source
(a file, a Kubernetes object) whose new version fails validation is reported and its last accepted version
stays in force: rejecting one never removes or changes policies already accepted.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sidecarless.policy.model import Endpoint, Node, Policy, Secret
from sidecarless.policy.reader import PolicyError, PolicyFileError
from sidecarless.policy.schema import PolicyDocuments


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...]
    secrets: tuple[Secret, ...]
    rejected: dict[str, tuple[PolicyError, ...]]  # source -> its errors (its last good version, if any, is kept)
    digest: str  # of the sources as read, so a writer can tell when its change has been seen


@dataclass(frozen=True)
class NodeState:
    """This node as a source describes it: its pods (and other nodes' pods), addresses and other interfaces."""

    endpoints: tuple[Endpoint, ...]
    node: Node
    interfaces: tuple[str, ...]  # non-pod interfaces traffic enters the node by (the lab's "world")


@dataclass(frozen=True)
class SourceUpdate:
    policy_set: PolicySet | None = None  # None: unchanged
    node: NodeState | None = None  # None: unchanged


class Source(Protocol):
    def updates(self) -> AsyncIterator[SourceUpdate]: ...

    def status(self) -> dict[str, Any]: ...


class LastGoodPolicies:
    """Each policy source's last accepted version, by the source's name (a file path, a Kubernetes object)."""

    def __init__(self) -> None:
        self._accepted: dict[str, tuple[bytes, PolicyDocuments]] = {}
        self._rejected: dict[str, tuple[PolicyError, ...]] = {}  # the sources whose version now is refused
        self._order: list[str] = []  # the names of `_accepted`, sorted: sorted again only when they change

    def update(
        self,
        sources: Mapping[str, bytes],
        parse: Callable[[str, bytes], PolicyDocuments],
        digest: str,
        changed: Collection[str] | None = None,
    ) -> PolicySet:
        """The policy set of every source as it is now: `sources` holds all of them (absent ones are removed),
        `parse` raises PolicyFileError for a version that cannot be accepted. `changed`: the only names that
        may differ from the last call (None: any), so one change among 20,000 sources looks at one."""
        names = sources.keys() | self._accepted.keys() | self._rejected.keys() if changed is None else changed
        reorder = False
        for name in names:
            raw = sources.get(name)
            if raw is None:
                reorder |= self._accepted.pop(name, None) is not None
                self._rejected.pop(name, None)
                continue
            known = self._accepted.get(name)
            if known is not None and known[0] == raw:
                self._rejected.pop(name, None)  # back to the version in force
                continue
            try:
                self._accepted[name] = (raw, parse(name, raw))
            except PolicyFileError as error:
                self._rejected[name] = tuple(error.errors)
                continue
            self._rejected.pop(name, None)
            reorder |= known is None
        if reorder:
            self._order = sorted(self._accepted)
        accepted = [self._accepted[name][1] for name in self._order]
        return PolicySet(
            policies=tuple(itertools.chain.from_iterable(documents.policies for documents in accepted)),
            secrets=tuple(itertools.chain.from_iterable(documents.secrets for documents in accepted)),
            rejected=dict(self._rejected),
            digest=digest,
        )
