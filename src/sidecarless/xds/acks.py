"""What Envoy has accepted and rejected, per type and resource, and the hooks that observe it. Pure state.

The agent reads an AckState to know when a change is enforced (agent/enforce.py); the protocol modules
(sotw.py, delta.py) write it as Envoy ACKs and NACKs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sidecarless.observe.logs import LogKey
from sidecarless.xds.resources import FULL_SET_TYPES, TYPE_ORDER
from sidecarless.xds.snapshot import Snapshot

log = logging.getLogger(__name__)


@dataclass
class AckState:
    """What one Envoy has accepted, per type and resource, and its last rejection per type.

    A node runs one Envoy, two while one replaces the other (`instance` tells them apart: the name the
    Envoy's node metadata gives). `synced`: it has held a whole snapshot at least once, so its listeners
    are active and it serves whatever the kernel sends it; `draining`: it is being replaced and no longer
    counts for what may be redirected."""

    accepted: dict[str, dict[str, str]] = field(default_factory=dict)  # type URL -> name -> digest
    rejected: dict[str, str] = field(default_factory=dict)  # type URL -> Envoy's error message
    responses: dict[str, int] = field(default_factory=dict)  # type URL -> responses sent
    connected: bool = False
    instance: str = ""
    synced: bool = False
    draining: bool = False

    def holds_type(self, type_url: str, snapshot: Snapshot) -> bool:
        """Envoy holds what `snapshot` has of this type: full sets exactly (a removal counts too); named
        types every resource the snapshot has (names Envoy still holds from a removed listener do no harm)."""
        accepted = self.accepted.get(type_url, {})
        wanted = snapshot.digests(type_url)
        if type_url in FULL_SET_TYPES:
            return accepted == wanted
        return all(accepted.get(name) == digest for name, digest in wanted.items())

    def holds(self, snapshot: Snapshot) -> bool:
        return all(self.holds_type(type_url, snapshot) for type_url in TYPE_ORDER)

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


Subscription = TypeVar("Subscription")


class Stream(Generic[Subscription]):
    """What one protocol stream (sotw.py, delta.py) reads and writes: the newest snapshot, the AckState of the
    Envoy on the other end, the observability hooks, the server's nonces, and its subscriptions by type URL."""

    def __init__(
        self, snapshot: Callable[[], Snapshot], acks: AckState, events: XdsEvents, nonces: Iterator[int]
    ) -> None:
        self._snapshot = snapshot
        self._acks = acks
        self._events = events
        self._nonces = nonces
        self._subscriptions: dict[str, Subscription] = {}
        self._sent_from: dict[str, Snapshot] = {}  # type URL -> the snapshot its last response came from
        self.rejected_from: Snapshot | None = None  # the snapshot of the response Envoy last rejected

    def _rejected(self, type_url: str, message: str, what: dict[str, object]) -> None:
        """Envoy NACKed a response: recorded, counted and logged with `what` it held."""
        self._acks.rejected[type_url] = message
        self.rejected_from = self._sent_from.get(type_url)
        self._events.on_nack(type_url, message)
        log.warning("envoy rejected configuration", extra={LogKey.TYPE_URL: type_url, **what, LogKey.ERROR: message})

    def _next_nonce(self, type_url: str, snapshot: Snapshot) -> str:
        """A response made from `snapshot` is about to go out: its nonce, and the response counted."""
        self._sent_from[type_url] = snapshot
        self._acks.count_response(type_url)
        self._events.on_response(type_url)
        return str(next(self._nonces))
