"""Aggregated Discovery Service (state of the world) on grpc.aio, serving one Snapshot to Envoy.

Contracts (XDS.md):
- every response has a fresh nonce; a request whose response_nonce is not the last one sent for its type on
  that stream is stale and ignored;
- a NACK is a request with error_detail; its configuration is parked, never resent, until the snapshot
  changes; the last good configuration stays in force in Envoy;
- a response is sent only when what the subscription should hold differs from what was last sent;
- types go out in TYPE_ORDER, and listeners wait until the clusters sent before them are ACKed;
- what Envoy accepted is tracked per resource (`AckState`), so the caller knows when a change is enforced.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from sidecarless.logs import LogKey
from sidecarless.xds.accesslog import AccessLogService
from sidecarless.xds.accesslog import add_to_server as add_access_log
from sidecarless.xds.render import CLUSTER_TYPE, LISTENER_TYPE
from sidecarless.xds.snapshot import FULL_SET_TYPES, TYPE_ORDER, Resource, Snapshot, version_of

log = logging.getLogger(__name__)


@dataclass
class AckState:
    """What one Envoy has accepted, per type and resource, and its last rejection per type."""

    accepted: dict[str, dict[str, str]] = field(default_factory=dict)  # type URL -> name -> digest
    rejected: dict[str, str] = field(default_factory=dict)  # type URL -> Envoy's error message
    responses: dict[str, int] = field(default_factory=dict)  # type URL -> responses sent
    connected: bool = False


@dataclass
class XdsEvents:
    """Observability hooks (callbacks, not log lines): metrics count what passes here."""

    on_response: Callable[[str], None] = lambda type_url: None
    on_ack: Callable[[str], None] = lambda type_url: None
    on_nack: Callable[[str, str], None] = lambda type_url, message: None


@dataclass
class _Subscription:
    names: frozenset[str] = frozenset()
    last_nonce: str | None = None
    sent_version: str | None = None
    sent: dict[str, str] = field(default_factory=dict)  # name -> digest of what the last response held
    acked_version: str | None = None
    parked_version: str | None = None  # NACKed: not sent again


@dataclass
class _DeltaSubscription:
    """Delta xDS: what Envoy holds of a type, per resource, and what it asked for."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)  # name -> version (digest) Envoy accepted
    in_flight: dict[str, tuple[dict[str, str], list[str]]] = field(default_factory=dict)  # nonce -> sent, removed
    rejected: dict[str, str] = field(default_factory=dict)  # name -> digest Envoy rejected: not sent again
    reported_missing: set[str] = field(default_factory=set)  # asked for before they exist: said so once
    started: bool = False


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, on_update: Callable[[], None] = lambda: None, events: XdsEvents | None = None) -> None:
        self._snapshot = Snapshot({})
        self._changed = asyncio.Condition()
        self._nonces = itertools.count(1)
        self._on_update = on_update
        self._events = events or XdsEvents()
        self._streams = 0
        self.acks = AckState()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        async with self._changed:
            self._changed.notify_all()

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        subscriptions: dict[str, _Subscription] = {}

        def receive(request: discovery_pb2.DiscoveryRequest) -> None:
            self._receive(request, subscriptions.setdefault(request.type_url, _Subscription()))

        async for response in self._stream(request_iterator, context, receive, lambda: self._responses(subscriptions)):
            yield response

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        subscriptions: dict[str, _DeltaSubscription] = {}

        def receive(request: discovery_pb2.DeltaDiscoveryRequest) -> None:
            self._receive_delta(request, subscriptions.setdefault(request.type_url, _DeltaSubscription()))

        responses = lambda: self._delta_responses(subscriptions)  # noqa: E731
        async for response in self._stream(request_iterator, context, receive, responses):
            yield response

    async def _stream(
        self,
        request_iterator: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        receive: Callable[[Any], None],
        responses: Callable[[], list[Any]],
    ) -> AsyncIterator[Any]:
        """One ADS stream: requests update the subscriptions; a request or a new snapshot wakes the sender,
        which sends what the subscriptions lack."""
        wake = asyncio.Event()
        failure: list[str] = []

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    if not request.type_url:
                        failure.append("ADS request without type_url")
                        break
                    receive(request)
                    wake.set()
            finally:
                failure.append("stream closed")
                wake.set()

        async def watch_snapshot() -> None:
            while True:
                async with self._changed:
                    await self._changed.wait()
                wake.set()

        # One Envoy per node: the newest stream is that Envoy; what an earlier one accepted is gone with it.
        self._streams += 1
        stream_number = self._streams
        self.acks = AckState(connected=True, responses=self.acks.responses)
        reader = asyncio.create_task(read_requests())
        watcher = asyncio.create_task(watch_snapshot())
        self._on_update()
        try:
            while True:
                await wake.wait()
                wake.clear()
                if failure:
                    if failure[0] != "stream closed":
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, failure[0])
                    return
                for response in responses():
                    yield response
        finally:
            reader.cancel()
            watcher.cancel()
            if stream_number == self._streams:
                # Envoy is gone (or restarting): nothing counts as accepted until a new stream ACKs it.
                self.acks = AckState(responses=self.acks.responses)
            self._on_update()

    def _receive(self, request: discovery_pb2.DiscoveryRequest, subscription: _Subscription) -> None:
        type_url = request.type_url
        if request.response_nonce and request.response_nonce != subscription.last_nonce:
            log.debug(
                "stale request ignored",
                extra={LogKey.TYPE_URL: type_url, LogKey.NONCE: request.response_nonce},
            )
            return
        subscription.names = frozenset(request.resource_names)
        if request.response_nonce and request.HasField("error_detail"):
            subscription.parked_version = subscription.sent_version
            self.acks.rejected[type_url] = request.error_detail.message
            self._events.on_nack(type_url, request.error_detail.message)
            log.warning(
                "envoy rejected configuration",
                extra={
                    LogKey.TYPE_URL: type_url,
                    LogKey.VERSION: subscription.sent_version,
                    LogKey.ERROR: request.error_detail.message,
                },
            )
        elif request.response_nonce:
            subscription.acked_version = subscription.sent_version
            self._accept(type_url, subscription.sent, subscription.names)
            self._events.on_ack(type_url)
        elif request.version_info and subscription.sent_version is None:
            # Envoy reconnected (the agent restarted) and says what it holds; with content-hash versions, if
            # that is what the snapshot has, it is not sent again and counts as accepted.
            selected = self._snapshot.select(type_url, subscription.names)
            if version_of(selected) == request.version_info:
                subscription.sent_version = subscription.acked_version = request.version_info
                subscription.sent = {resource.name: resource.digest for resource in selected}
                self._accept(type_url, subscription.sent, subscription.names)
                log.info("envoy already holds the configuration", extra={LogKey.TYPE_URL: type_url})
        if type_url not in FULL_SET_TYPES and type_url in self.acks.accepted:
            # Envoy dropped the names it no longer subscribes to (a removed listener's routes) on its side.
            held = self.acks.accepted[type_url]
            self.acks.accepted[type_url] = {name: held[name] for name in held if name in subscription.names}
        self._on_update()

    def _accept(self, type_url: str, digests: dict[str, str], names: frozenset[str]) -> None:
        self.acks.rejected.pop(type_url, None)
        accepted = dict(digests)
        if type_url not in FULL_SET_TYPES:
            # Named types: Envoy keeps what earlier responses gave it for names it still subscribes to.
            previous = self.acks.accepted.get(type_url, {})
            accepted = {**{n: d for n, d in previous.items() if n in names}, **accepted}
        self.acks.accepted[type_url] = accepted

    def _receive_delta(self, request: discovery_pb2.DeltaDiscoveryRequest, subscription: _DeltaSubscription) -> None:
        """Delta: subscription changes count even on a stale nonce; ACK and NACK are matched by nonce."""
        type_url = request.type_url
        first, subscription.started = not subscription.started, True
        if first and type_url in FULL_SET_TYPES and not request.resource_names_subscribe:
            subscription.wildcard = True
        for name in request.resource_names_subscribe:
            if name == "*":
                subscription.wildcard = True
            else:
                subscription.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                subscription.wildcard = False
            subscription.names.discard(name)
            subscription.held.pop(name, None)
            subscription.reported_missing.discard(name)
        if first and request.initial_resource_versions:
            # Envoy reconnected (the agent restarted): it holds these; only differences are sent.
            subscription.held.update(request.initial_resource_versions)
            log.info(
                "envoy reconnected holding resources",
                extra={LogKey.TYPE_URL: type_url, LogKey.RESOURCES: len(subscription.held)},
            )
        in_flight = subscription.in_flight.pop(request.response_nonce, None) if request.response_nonce else None
        if in_flight is not None:
            sent, removed = in_flight
            if request.HasField("error_detail"):
                subscription.rejected.update(sent)
                self.acks.rejected[type_url] = request.error_detail.message
                self._events.on_nack(type_url, request.error_detail.message)
                log.warning(
                    "envoy rejected configuration",
                    extra={
                        LogKey.TYPE_URL: type_url,
                        LogKey.RESOURCES: sorted(sent),
                        LogKey.ERROR: request.error_detail.message,
                    },
                )
            else:
                subscription.held.update(sent)
                for name in removed:
                    subscription.held.pop(name, None)
                self.acks.rejected.pop(type_url, None)
                self._events.on_ack(type_url)
        self.acks.accepted[type_url] = {
            name: version
            for name, version in subscription.held.items()
            if subscription.wildcard or name in subscription.names
        }
        self._on_update()

    def _delta_responses(
        self, subscriptions: dict[str, _DeltaSubscription]
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        responses = []
        for type_url in TYPE_ORDER:
            subscription = subscriptions.get(type_url)
            if subscription is None or not subscription.started:
                continue
            clusters = subscriptions.get(CLUSTER_TYPE)
            if type_url == LISTENER_TYPE and clusters is not None and clusters.in_flight:
                continue  # make before break: listeners only once Envoy has the clusters they use
            response = self._delta_response(type_url, subscription)
            if response is not None:
                responses.append(response)
        return responses

    def _delta_response(
        self, type_url: str, subscription: _DeltaSubscription
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        resources = self._snapshot.resources.get(type_url, {})
        in_scope = set(resources) if subscription.wildcard else subscription.names & set(resources)
        flying = {name: digest for sent, _ in subscription.in_flight.values() for name, digest in sent.items()}
        flying_removed = {name for _, removed in subscription.in_flight.values() for name in removed}
        changed = [
            resources[name]
            for name in sorted(in_scope)
            if resources[name].digest
            not in (subscription.held.get(name), flying.get(name), subscription.rejected.get(name))
        ]
        gone = sorted(name for name in subscription.held if name not in in_scope and name not in flying_removed)
        missing = sorted(subscription.names - set(resources) - subscription.reported_missing - set(subscription.held))
        if not changed and not gone and not missing:
            return None
        nonce = str(next(self._nonces))
        subscription.in_flight[nonce] = ({resource.name: resource.digest for resource in changed}, gone)
        subscription.reported_missing |= set(missing)
        subscription.reported_missing -= {resource.name for resource in changed}
        self.acks.responses[type_url] = self.acks.responses.get(type_url, 0) + 1
        self._events.on_response(type_url)
        log.info(
            "sending configuration (delta)",
            extra={"type_url": type_url, "resources": len(changed), "removed": len(gone) + len(missing)},
        )
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version_of(resources[name] for name in in_scope),
            resources=[
                discovery_pb2.Resource(name=resource.name, version=resource.digest, resource=resource.body)
                for resource in changed
            ],
            removed_resources=[*gone, *missing],
            type_url=type_url,
            nonce=nonce,
        )

    def _responses(self, subscriptions: dict[str, _Subscription]) -> list[discovery_pb2.DiscoveryResponse]:
        responses = []
        for type_url in TYPE_ORDER:
            subscription = subscriptions.get(type_url)
            if subscription is None:
                continue
            if type_url == LISTENER_TYPE and self._clusters_pending(subscriptions):
                continue  # make before break: a route must never name a cluster Envoy does not have
            selected = self._snapshot.select(type_url, subscription.names)
            version = version_of(selected)
            if version in (subscription.sent_version, subscription.parked_version):
                continue
            responses.append(self._response(type_url, version, selected, subscription))
        return responses

    def _clusters_pending(self, subscriptions: dict[str, _Subscription]) -> bool:
        clusters = subscriptions.get(CLUSTER_TYPE)
        if clusters is None:
            return False
        return clusters.sent_version != clusters.acked_version and clusters.parked_version != clusters.sent_version

    def _response(
        self, type_url: str, version: str, selected: list[Resource], subscription: _Subscription
    ) -> discovery_pb2.DiscoveryResponse:
        nonce = str(next(self._nonces))
        subscription.last_nonce = nonce
        subscription.sent_version = version
        subscription.sent = {resource.name: resource.digest for resource in selected}
        subscription.parked_version = None
        self.acks.responses[type_url] = self.acks.responses.get(type_url, 0) + 1
        self._events.on_response(type_url)
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


async def start_server(ads: AdsServer, socket_path: str, access_log: AccessLogService | None = None) -> grpc.aio.Server:
    """ADS (and the access log service, which Envoy reaches over the same socket) on a Unix socket."""
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    if access_log is not None:
        add_access_log(access_log, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    os.chmod(socket_path, 0o660)  # the agent's user and group only (Envoy runs as the same user)
    return server
