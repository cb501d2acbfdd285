"""Two Envoys on one node while one replaces the other (issue 16): both served, the newest is the node's
Envoy, and a new Envoy never starts from a configuration another one rejected."""

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from sidecarless.xds.resources import CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE
from sidecarless.xds.server import AdsServer, start_server
from sidecarless.xds.snapshot import Snapshot
from tests.unit.test_xds_server import Client, snapshot_of


class EnvoyClient(Client):
    """A state-of-the-world stream that names its instance in the node metadata, as envoy/process.py does."""

    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, instance: str) -> None:
        super().__init__(stub)
        self.instance = instance

    async def put(self, request: discovery_pb2.DiscoveryRequest) -> None:
        request.node.metadata.fields["instance"].string_value = self.instance
        await self.requests.put(request)

    async def fetch(self, type_url: str, names: tuple[str, ...] = ()) -> Any:
        await self.put(discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names))
        return await self.receive()

    async def ack(self, response: Any, names: tuple[str, ...] = ()) -> None:
        await self.put(
            discovery_pb2.DiscoveryRequest(
                type_url=response.type_url,
                resource_names=names,
                response_nonce=response.nonce,
                version_info=response.version_info,
            )
        )

    async def nack(self, response: Any, names: tuple[str, ...] = ()) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=response.type_url, resource_names=names, response_nonce=response.nonce
        )
        request.error_detail.message = "rejected"
        await self.put(request)


@pytest.fixture
async def connect(tmp_path: Path) -> AsyncIterator[tuple[AdsServer, Callable[[str], EnvoyClient]]]:
    server = AdsServer()
    socket_path = tmp_path / "xds.sock"
    grpc_server = await start_server(server, str(socket_path))
    channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
    clients: list[EnvoyClient] = []

    def new_client(instance: str) -> EnvoyClient:
        client = EnvoyClient(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), instance)
        clients.append(client)
        return client

    yield server, new_client
    for client in clients:
        await client.close()
    await channel.close()
    await grpc_server.stop(grace=None)


def routes_of(snapshot: Snapshot) -> tuple[str, ...]:
    return tuple(sorted(snapshot.resources[ROUTE_TYPE]))


async def until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 2)


async def hold_all(client: EnvoyClient, snapshot: Snapshot) -> dict[str, Any]:
    """Envoy's start: clusters, listeners, then the routes its listeners name, each ACKed."""
    responses = {}
    for type_url, names in ((CLUSTER_TYPE, ()), (LISTENER_TYPE, ()), (ROUTE_TYPE, routes_of(snapshot))):
        responses[type_url] = await client.fetch(type_url, names)
        await client.ack(responses[type_url], names)
    return responses


async def running_envoy_then_a_change(
    server: AdsServer, new_client: Callable[[str], EnvoyClient], text: str
) -> tuple[EnvoyClient, Snapshot, Snapshot]:
    """envoy-1 holds the good snapshot whole; then a change (the bad one) is published."""
    good = snapshot_of(text)
    await server.publish(good)
    old = new_client("envoy-1")
    await hold_all(old, good)
    await until(lambda: server.acks.synced)
    bad = snapshot_of(text.replace("method: GET", "method: HEAD"))
    await server.publish(bad)
    return old, good, bad


async def test_the_newest_envoy_is_the_nodes_and_each_is_known_by_instance(
    connect: tuple[AdsServer, Callable[[str], EnvoyClient]], billing_policy_text: str
) -> None:
    server, new_client = connect
    snapshot = snapshot_of(billing_policy_text)
    await server.publish(snapshot)
    old = new_client("envoy-1")
    await hold_all(old, snapshot)
    await until(lambda: server.acks.synced)
    new = new_client("envoy-2")
    await new.fetch(CLUSTER_TYPE)
    await until(lambda: len(server.streams) == 2)
    assert [state.instance for state in server.streams] == ["envoy-1", "envoy-2"]
    assert server.acks.instance == "envoy-2" and not server.acks.synced  # still starting
    server.drain("envoy-1")
    assert server.streams[0].draining and not server.streams[1].draining
    await old.requests.put(None)  # the old Envoy exits
    await until(lambda: [state.instance for state in server.streams] == ["envoy-2"])


async def test_a_new_envoy_gets_the_last_good_configuration_while_the_newest_is_rejected(
    connect: tuple[AdsServer, Callable[[str], EnvoyClient]], billing_policy_text: str
) -> None:
    """The running Envoy rejects a change (it keeps what it held); an Envoy started now must get what the
    running one holds, not the rejected configuration (which would leave it with nothing)."""
    server, new_client = connect
    old, good, bad = await running_envoy_then_a_change(server, new_client, billing_policy_text)
    rejected = await old.receive()
    assert rejected.type_url == ROUTE_TYPE
    await old.nack(rejected, routes_of(bad))
    await until(lambda: ROUTE_TYPE in server.acks.rejected)

    new = new_client("envoy-2")
    responses = await hold_all(new, bad)
    assert [resource.value for resource in responses[ROUTE_TYPE].resources] == [
        resource.body.value for resource in good.resources[ROUTE_TYPE].values()
    ]
    await until(lambda: server.acks.instance == "envoy-2" and server.acks.synced)
    assert server.acks.accepted[ROUTE_TYPE] == good.digests(ROUTE_TYPE)
    assert await new.nothing_within(0.2)  # the rejected configuration is not sent after it

    fixed = snapshot_of(billing_policy_text.replace("method: GET", "method: PUT"))
    await server.publish(fixed)  # a new change reaches every Envoy again
    assert (await new.receive()).version_info == (await old.receive()).version_info


async def test_a_new_envoy_that_rejects_the_newest_first_is_moved_to_the_last_good(
    connect: tuple[AdsServer, Callable[[str], EnvoyClient]], billing_policy_text: str
) -> None:
    """The new Envoy is the first to see the rejected change: after its NACK it gets the last good."""
    server, new_client = connect
    _, good, bad = await running_envoy_then_a_change(server, new_client, billing_policy_text)
    new = new_client("envoy-2")
    for type_url in (CLUSTER_TYPE, LISTENER_TYPE):
        await new.ack(await new.fetch(type_url))
    rejected = await new.fetch(ROUTE_TYPE, routes_of(bad))
    await new.nack(rejected, routes_of(bad))
    fallback = await new.receive()
    assert fallback.type_url == ROUTE_TYPE
    assert [resource.value for resource in fallback.resources] == [
        resource.body.value for resource in good.resources[ROUTE_TYPE].values()
    ]


async def test_an_envoy_that_held_a_whole_snapshot_keeps_it_on_a_nack(
    connect: tuple[AdsServer, Callable[[str], EnvoyClient]], billing_policy_text: str
) -> None:
    """Envoy's own rule: a rejected update leaves the last accepted one in force; nothing is sent."""
    server, new_client = connect
    only, _, bad = await running_envoy_then_a_change(server, new_client, billing_policy_text)
    await only.nack(await only.receive(), routes_of(bad))
    assert await only.nothing_within(0.3)
