"""Aggregated Discovery Service on grpc.aio: one Snapshot served to Envoy, state of the world or delta.

State is separate from protocol (as in go-control-plane): the agent publishes an immutable Snapshot
(snapshot.py); each stream speaks one protocol (sotw.py, delta.py) against the newest snapshot; what Envoy
accepted is tracked per resource (acks.py), so the caller knows when a change is enforced. Contracts in XDS.md:
- every response has a fresh nonce; types go out in TYPE_ORDER (resources.py);
- a NACK's configuration is never resent until the snapshot changes; the last good one stays in force in Envoy;
- a response is sent only when what the subscription should hold differs from what was last sent.
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
                    stream.receive(request)
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

        # One Envoy per node: the newest stream is that Envoy; what an earlier one accepted is gone with it.
        self._streams += 1
        stream_number = self._streams
        self.acks = AckState(connected=True, responses=self.acks.responses)
        stream = protocol(lambda: self._snapshot, self.acks, self._events, self._nonces)
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
            if stream_number == self._streams:
                # Envoy is gone (or restarting): nothing counts as accepted until a new stream ACKs it.
                self.acks = AckState(responses=self.acks.responses)
            self._on_update()


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
