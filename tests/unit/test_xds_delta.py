"""Delta ADS (incremental xDS): the protocol rules of XDS.md, driven by a gRPC client."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from sidecarless.xds.resources import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE
from sidecarless.xds.server import AdsServer, start_server
from tests.unit.ads_client import StreamClient
from tests.unit.test_xds_server import ROUTE, _until, snapshot_of


class DeltaClient(StreamClient):
    """Delta ADS."""

    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        super().__init__(stub.DeltaAggregatedResources)

    async def send(
        self,
        type_url: str,
        subscribe: tuple[str, ...] = (),
        unsubscribe: tuple[str, ...] = (),
        nonce: str = "",
        error: str | None = None,
        initial: dict[str, str] | None = None,
    ) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=subscribe,
            resource_names_unsubscribe=unsubscribe,
            response_nonce=nonce,
            initial_resource_versions=initial or {},
        )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.requests.put(request)


@pytest.fixture
async def delta(tmp_path: Path) -> AsyncIterator[tuple[AdsServer, DeltaClient]]:
    server = AdsServer()
    socket_path = tmp_path / "xds.sock"
    grpc_server = await start_server(server, str(socket_path))
    channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
    client = DeltaClient(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel))
    yield server, client
    await client.close()
    await channel.close()
    await grpc_server.stop(grace=None)


async def test_wildcard_then_only_changes_are_sent(
    delta: tuple[AdsServer, DeltaClient], billing_policy_text: str
) -> None:
    server, client = delta
    await server.publish(snapshot_of(billing_policy_text))
    await client.send(CLUSTER_TYPE)  # no names: a wildcard subscription
    first = await client.receive()
    assert [r.name for r in first.resources] == ["sidecarless/original-destination"]
    await client.send(CLUSTER_TYPE, nonce=first.nonce)
    await client.send(ROUTE_TYPE, subscribe=(ROUTE,))
    route = await client.receive()
    assert [r.name for r in route.resources] == [ROUTE] and route.resources[0].version
    await client.send(ROUTE_TYPE, nonce=route.nonce)
    await asyncio.wait_for(_until(lambda: ROUTE in server.acks.accepted.get(ROUTE_TYPE, {})), 2)
    # The same snapshot again: nothing to send. A changed route: only it.
    await server.publish(snapshot_of(billing_policy_text))
    assert await client.nothing_within(0.2)
    await server.publish(snapshot_of(billing_policy_text.replace("method: GET", "method: HEAD")))
    changed = await client.receive()
    assert changed.type_url == ROUTE_TYPE and [r.name for r in changed.resources] == [ROUTE]


async def test_nack_is_not_resent_until_the_resource_changes(
    delta: tuple[AdsServer, DeltaClient], billing_policy_text: str
) -> None:
    server, client = delta
    await server.publish(snapshot_of(billing_policy_text))
    await client.send(ROUTE_TYPE, subscribe=(ROUTE,))
    first = await client.receive()
    await client.send(ROUTE_TYPE, nonce=first.nonce, error="bad route")
    assert await client.nothing_within(0.3)
    assert server.acks.rejected[ROUTE_TYPE] == "bad route"
    await server.publish(snapshot_of(billing_policy_text.replace("method: GET", "method: HEAD")))
    assert [r.name for r in (await client.receive()).resources] == [ROUTE]


async def test_missing_names_are_reported_removed_and_served_when_they_appear(
    delta: tuple[AdsServer, DeltaClient], billing_policy_text: str
) -> None:
    server, client = delta
    await client.send(ROUTE_TYPE, subscribe=(ROUTE,))
    missing = await client.receive()
    assert list(missing.resources) == [] and list(missing.removed_resources) == [ROUTE]
    await client.send(ROUTE_TYPE, nonce=missing.nonce)
    await server.publish(snapshot_of(billing_policy_text))
    appeared = await client.receive()
    assert [r.name for r in appeared.resources] == [ROUTE]


async def test_subscription_changes_count_on_a_stale_nonce(
    delta: tuple[AdsServer, DeltaClient], billing_policy_text: str
) -> None:
    server, client = delta
    await server.publish(snapshot_of(billing_policy_text))
    await client.send(ROUTE_TYPE, subscribe=("other-route",))
    missing = await client.receive()
    await client.send(ROUTE_TYPE, subscribe=(ROUTE,), nonce="a-stale-nonce")
    route = await client.receive()
    assert [r.name for r in route.resources] == [ROUTE]
    del missing


async def test_reconnect_with_initial_versions_sends_only_differences(
    delta: tuple[AdsServer, DeltaClient], billing_policy_text: str
) -> None:
    server, client = delta
    snapshot = snapshot_of(billing_policy_text)
    await server.publish(snapshot)
    held = snapshot.digests(ROUTE_TYPE)
    await client.send(ROUTE_TYPE, subscribe=(ROUTE,), initial=held)
    assert await client.nothing_within(0.3)
    assert server.acks.accepted[ROUTE_TYPE] == held
    listeners = snapshot.digests(LISTENER_TYPE)
    await client.send(LISTENER_TYPE, initial={name: "an-old-version" for name in listeners})
    assert [r.name for r in (await client.receive()).resources] == list(listeners)
