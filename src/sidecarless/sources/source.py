"""What every policy and endpoint source gives the agent, and the last-good rule they share.

A source is an async iterator of updates: a new policy set, a new view of the node, or both. A policy source
(a file, a Kubernetes object) whose new version fails validation is reported and its last accepted version
stays in force: rejecting one never removes or changes policies already accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
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

    def update(
        self, sources: Mapping[str, bytes], parse: Callable[[str, bytes], PolicyDocuments], digest: str
    ) -> PolicySet:
        """The policy set of every source as it is now: `sources` holds all of them (absent ones are removed),
        `parse` raises PolicyFileError for a version that cannot be accepted."""
        rejected: dict[str, tuple[PolicyError, ...]] = {}
        for name, raw in sources.items():
            if name in self._accepted and self._accepted[name][0] == raw:
                continue
            try:
                self._accepted[name] = (raw, parse(name, raw))
            except PolicyFileError as error:
                rejected[name] = tuple(error.errors)
        for name in set(self._accepted) - set(sources):
            del self._accepted[name]
        accepted = [documents for _, (_, documents) in sorted(self._accepted.items())]
        return PolicySet(
            policies=tuple(policy for documents in accepted for policy in documents.policies),
            secrets=tuple(secret for documents in accepted for secret in documents.secrets),
            rejected=rejected,
            digest=digest,
        )
