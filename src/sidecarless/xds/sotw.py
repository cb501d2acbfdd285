"""State-of-the-world ADS: per type, each response carries everything the subscription should hold.

- a request whose response_nonce is not the last one sent for its type on that stream is stale and ignored;
- a NACK parks the configuration it rejected: not resent until the snapshot changes;
- a response is sent only when what the subscription should hold differs from what was last sent;
- listeners wait until the clusters sent before them are ACKed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from sidecarless.observe.logs import LogKey
from sidecarless.xds.acks import Stream
from sidecarless.xds.resources import CLUSTER_TYPE, FULL_SET_TYPES, LISTENER_TYPE, TYPE_ORDER
from sidecarless.xds.snapshot import Resource, Snapshot, version_of

log = logging.getLogger(__name__)


@dataclass
class _Subscription:
    names: frozenset[str] = frozenset()
    last_nonce: str | None = None
    sent_version: str | None = None
    sent: dict[str, str] = field(default_factory=dict)  # name -> digest of what the last response held
    acked_version: str | None = None
    parked_version: str | None = None  # NACKed: not sent again


class SotwStream(Stream[_Subscription]):
    """The subscriptions of one state-of-the-world stream, and what Envoy accepted on it."""

    def receive(self, request: discovery_pb2.DiscoveryRequest) -> None:
        type_url = request.type_url
        subscription = self._subscriptions.setdefault(type_url, _Subscription())
        if request.response_nonce and request.response_nonce != subscription.last_nonce:
            log.debug(
                "stale request ignored",
                extra={LogKey.TYPE_URL: type_url, LogKey.NONCE: request.response_nonce},
            )
            return
        subscription.names = frozenset(request.resource_names)
        if request.response_nonce and request.HasField("error_detail"):
            subscription.parked_version = subscription.sent_version
            self._rejected(type_url, request.error_detail.message, {LogKey.VERSION: subscription.sent_version})
        elif request.response_nonce:
            subscription.acked_version = subscription.sent_version
            self._acks.accept(type_url, subscription.sent, subscription.names)
            self._events.on_ack(type_url)
        elif request.version_info and subscription.sent_version is None:
            # Envoy reconnected (the agent restarted) and says what it holds; with content-hash versions, if
            # that is what the snapshot has, it is not sent again and counts as accepted.
            selected = self._snapshot().select(type_url, subscription.names)
            if version_of(selected) == request.version_info:
                subscription.sent_version = subscription.acked_version = request.version_info
                subscription.sent = {resource.name: resource.digest for resource in selected}
                self._acks.accept(type_url, subscription.sent, subscription.names)
                log.info("envoy already holds the configuration", extra={LogKey.TYPE_URL: type_url})
        if type_url not in FULL_SET_TYPES and type_url in self._acks.accepted:
            # Envoy dropped the names it no longer subscribes to (a removed listener's routes) on its side.
            held = self._acks.accepted[type_url]
            self._acks.accepted[type_url] = {name: held[name] for name in held if name in subscription.names}

    def responses(self) -> list[discovery_pb2.DiscoveryResponse]:
        responses = []
        snapshot = self._snapshot()
        for type_url in TYPE_ORDER:
            subscription = self._subscriptions.get(type_url)
            if subscription is None:
                continue
            if type_url == LISTENER_TYPE and self._clusters_pending():
                continue  # make before break: a route must never name a cluster Envoy does not have
            selected = snapshot.select(type_url, subscription.names)
            version = version_of(selected)
            if version in (subscription.sent_version, subscription.parked_version):
                continue
            responses.append(self._response(type_url, version, selected, subscription, snapshot))
        return responses

    def _clusters_pending(self) -> bool:
        clusters = self._subscriptions.get(CLUSTER_TYPE)
        if clusters is None:
            return False
        return clusters.sent_version != clusters.acked_version and clusters.parked_version != clusters.sent_version

    def _response(
        self,
        type_url: str,
        version: str,
        selected: list[Resource],
        subscription: _Subscription,
        snapshot: Snapshot,
    ) -> discovery_pb2.DiscoveryResponse:
        nonce = self._next_nonce(type_url, snapshot)
        subscription.last_nonce = nonce
        subscription.sent_version = version
        subscription.sent = {resource.name: resource.digest for resource in selected}
        subscription.parked_version = None
        log.info(
            "sending configuration",
            extra={"type_url": type_url, "version": version, "resources": len(selected)},
        )
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[resource.body for resource in selected],
            type_url=type_url,
            nonce=nonce,
        )
