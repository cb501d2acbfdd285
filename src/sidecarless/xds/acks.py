"""What Envoy has accepted and rejected, per type and resource, and the hooks that observe it. Pure state.

The agent reads an AckState to know when a change is enforced (agent/enforce.py); the protocol modules
(sotw.py, delta.py) write it as Envoy ACKs and NACKs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sidecarless.xds.resources import FULL_SET_TYPES


@dataclass
class AckState:
    """What one Envoy has accepted, per type and resource, and its last rejection per type."""

    accepted: dict[str, dict[str, str]] = field(default_factory=dict)  # type URL -> name -> digest
    rejected: dict[str, str] = field(default_factory=dict)  # type URL -> Envoy's error message
    responses: dict[str, int] = field(default_factory=dict)  # type URL -> responses sent
    connected: bool = False

    def accept(self, type_url: str, digests: dict[str, str], names: frozenset[str]) -> None:
        """Envoy ACKed a response holding `digests` while subscribed to `names`."""
        self.rejected.pop(type_url, None)
        accepted = dict(digests)
        if type_url not in FULL_SET_TYPES:
            # Named types: Envoy keeps what earlier responses gave it for names it still subscribes to.
            previous = self.accepted.get(type_url, {})
            accepted = {**{n: d for n, d in previous.items() if n in names}, **accepted}
        self.accepted[type_url] = accepted

    def count_response(self, type_url: str) -> None:
        self.responses[type_url] = self.responses.get(type_url, 0) + 1


@dataclass
class XdsEvents:
    """Observability hooks (callbacks, not log lines): metrics count what passes here."""

    on_response: Callable[[str], None] = lambda type_url: None
    on_ack: Callable[[str], None] = lambda type_url: None
    on_nack: Callable[[str, str], None] = lambda type_url, message: None
