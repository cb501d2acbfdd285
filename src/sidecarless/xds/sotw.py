"""State-of-the-world ADS: per type, each response brings Envoy to everything the subscription should hold.

- a request whose response_nonce is not the last one sent for its type on that stream is stale and ignored;
- a NACK parks the configuration it rejected: not resent until the snapshot changes;
- a response is sent only when what the subscription should hold differs from what was last sent;
- listeners wait until the clusters sent before them are ACKed;
- listeners and clusters go whole in every response (Envoy removes what a response leaves out); routes, named
  resources, go only where they differ from what Envoy holds, one response in flight at a time (the xDS
  protocol's "grouping resources into responses"): a change to two pods' routes sends two routes, not the
  node's 2,000. After a NACK Envoy's routes are not known, and the next response carries all of them.
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
    sent: dict[str, str] = field(default_factory=dict)  # name -> digest Envoy holds once it ACKs the last response
    held: dict[str, str] = field(default_factory=dict)  # named types: what Envoy holds (ACKed), for the next diff
    in_flight: bool = False  # named types: a response awaits its ACK or NACK
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
        if request.response_nonce:
            subscription.in_flight = False
        if request.response_nonce and request.HasField("error_detail"):
            subscription.parked_version = subscription.sent_version
            subscription.held = {}  # some of the response may have been applied: send everything next time
            self._rejected(type_url, request.error_detail.message, {LogKey.VERSION: subscription.sent_version})
        elif request.response_nonce:
            subscription.acked_version = subscription.sent_version
            subscription.held = dict(subscription.sent)
            self._acks.accept(type_url, subscription.sent, subscription.names)
            self._events.on_ack(type_url)
        elif request.version_info and subscription.sent_version is None:
            # Envoy reconnected (the agent restarted) and says what it holds; with content-hash versions, if
            # that is what the snapshot has, it is not sent again and counts as accepted.
            selected = self._snapshot().select(type_url, subscription.names)
            if version_of(selected) == request.version_info:
                subscription.sent_version = subscription.acked_version = request.version_info
                subscription.sent = {resource.name: resource.digest for resource in selected}
                subscription.held = dict(subscription.sent)
                self._acks.accept(type_url, subscription.sent, subscription.names)
                log.info("envoy already holds the configuration", extra={LogKey.TYPE_URL: type_url})
        # Envoy forgets the names it no longer subscribes to: one subscribed again is sent again.
        subscription.held = {name: digest for name, digest in subscription.held.items() if name in subscription.names}
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
            named = type_url not in FULL_SET_TYPES
            if named and subscription.in_flight:
                continue  # its ACK says what Envoy holds; the next response is the difference from that
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
        carried = selected
        if type_url not in FULL_SET_TYPES:
            subscription.in_flight = True
            carried = [resource for resource in selected if subscription.held.get(resource.name) != resource.digest]
        log.info(
            "sending configuration",
            extra={"type_url": type_url, "version": version, "resources": len(carried)},
        )
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[resource.body for resource in carried],
            type_url=type_url,
            nonce=nonce,
        )
