"""Aggregated Discovery Service on grpc.aio: one Snapshot served to Envoy, state of the world or delta.

State is separate from protocol (as in go-control-plane): the agent publishes an immutable Snapshot
(snapshot.py); each stream speaks one protocol (sotw.py, delta.py) against the newest snapshot; what Envoy
accepted is tracked per resource (acks.py), so the caller knows when a change is enforced. Contracts in XDS.md:
- every response has a fresh nonce; types go out in TYPE_ORDER (resources.py);
- a NACK's configuration is never resent until the snapshot changes; the last good one stays in force in Envoy;
- a response is sent only when what the subscription should hold differs from what was last sent;
- while one Envoy replaces another, both are served; the newest stream is the node's Envoy for status;
- a new Envoy never starts from a configuration known to be rejected: while the newest snapshot is NACKed, a
  stream that has never held a whole snapshot is served the last one an Envoy held whole (the last good).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from sidecarless.xds.accesslog import AccessLogService
from sidecarless.xds.accesslog import add_to_server as add_access_log
from sidecarless.xds.acks import AckState, XdsEvents
from sidecarless.xds.delta import DeltaStream
from sidecarless.xds.snapshot import Snapshot
from sidecarless.xds.sotw import SotwStream


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, on_update: Callable[[], None] = lambda: None, events: XdsEvents | None = None) -> None:
        self._snapshot = Snapshot({})
        self._changed = asyncio.Condition()
        self._nonces = itertools.count(1)
        self._on_update = on_update
        self._events = events or XdsEvents()
        self._streams = 0
        self._responses: dict[str, int] = {}  # type URL -> responses sent, over every stream
        # One per connected Envoy, oldest first; replaced, never changed in place: the API reads it from a thread.
        self.streams: tuple[AckState, ...] = ()
        self._last_good: Snapshot | None = None  # the newest snapshot an Envoy has held whole
        self._rejected = False  # an Envoy rejected part of the newest snapshot
        self._pinned: dict[int, Snapshot] = {}  # stream number -> the last good snapshot it is served instead

    @property
    def acks(self) -> AckState:
        """The newest Envoy's (the one that replaces the others), or an unconnected state."""
        streams = self.streams
        return streams[-1] if streams else AckState(responses=self._responses)

    def envoys(self) -> tuple[AckState, tuple[AckState, ...]]:
        """The newest Envoy's state and the older ones', read at once (the agent reads them from a thread)."""
        streams = self.streams
        return (streams[-1], streams[:-1]) if streams else (AckState(responses=self._responses), ())

    def holds_whole_configuration(self, instance: str) -> bool:
        """The Envoy named `instance` is connected and has held a whole snapshot (the newest, or the last good
        while the newest is rejected): its listeners are active."""
        return any(state.instance == instance and state.synced for state in self.streams)

    def drain(self, instance: str) -> None:
        """The Envoy named `instance` is being replaced: what it holds no longer decides redirects."""
        for state in self.streams:
            if state.instance == instance:
                state.draining = True
        self._on_update()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._rejected = False
        self._pinned.clear()  # every stream moves to the newest snapshot
        async with self._changed:
            self._changed.notify_all()

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        async for response in self._stream(request_iterator, context, SotwStream):
            yield response

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        async for response in self._stream(request_iterator, context, DeltaStream):
            yield response

    async def _stream(
        self,
        request_iterator: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        protocol: type[SotwStream | DeltaStream],
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
                    if not acks.instance and request.HasField("node"):
                        acks.instance = _instance_of(request.node)
                    stream.receive(request)
                    self._after_request(stream_number, stream, acks)
                    self._on_update()
                    wake.set()
            finally:
                failure.append("stream closed")
                wake.set()

        async def watch_snapshot() -> None:
            while True:
                async with self._changed:
                    await self._changed.wait()
                wake.set()

        self._streams += 1
        stream_number = self._streams
        acks = AckState(connected=True, responses=self._responses)
        self.streams = (*self.streams, acks)
        if self._rejected and self._last_good is not None:
            self._pinned[stream_number] = self._last_good
        stream = protocol(lambda: self._serving(stream_number), acks, self._events, self._nonces)
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
                for response in stream.responses():
                    yield response
        finally:
            reader.cancel()
            watcher.cancel()
            # That Envoy is gone (or restarting): what it accepted is gone with it.
            self.streams = tuple(state for state in self.streams if state is not acks)
            self._pinned.pop(stream_number, None)
            self._on_update()

    def _serving(self, stream_number: int) -> Snapshot:
        return self._pinned.get(stream_number, self._snapshot)

    def _after_request(self, stream_number: int, stream: SotwStream | DeltaStream, acks: AckState) -> None:
        """Track the last good snapshot; a stream that holds nothing whole when the newest snapshot turns out
        to be rejected is moved to the last good one (a running Envoy keeps what it holds on a NACK)."""
        serving = self._serving(stream_number)
        if serving.resources and acks.holds(serving):
            acks.synced = True
            if serving is self._snapshot:
                self._last_good = serving
        if stream.rejected_from is not None and stream.rejected_from is self._snapshot:
            self._rejected = True
            if not acks.synced and self._last_good is not None and self._last_good is not self._snapshot:
                self._pinned[stream_number] = self._last_good


def _instance_of(node: Any) -> str:
    """An Envoy's instance name (node metadata `instance`, set by envoy/process.py), else its node id."""
    instance = node.metadata.fields.get("instance")
    return str(instance.string_value) if instance is not None and instance.string_value else str(node.id)


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
