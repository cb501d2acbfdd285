"""The agent API's one action, `POST /v1/envoy/restart`: taken on the Unix socket (its file mode is the access
control), refused on the loopback TCP address, which any process of the node's network (a hostNetwork pod)
can reach; a client that goes away does not cancel a handover halfway."""

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp

from sidecarless.api.server import start_api
from sidecarless.envoy.process import HandoverFailed


class FakeAgentApi:
    """Only what the action needs (the rest of AgentApi is not called here)."""

    def __init__(self, fail: bool = False) -> None:
        self.restarts_started = 0
        self.restarts_finished = 0
        self.fail = fail
        self.concurrency: list[int | None] = []

    async def restart_envoy(self, concurrency: int | None = None) -> dict[str, Any]:
        self.restarts_started += 1
        self.concurrency.append(concurrency)
        await asyncio.sleep(0.3)
        if self.fail:
            raise HandoverFailed("the new Envoy exited before it was ready")
        self.restarts_finished += 1
        return {"old_pid": 1, "new_pid": 2}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_restart_is_taken_on_the_unix_socket_only(tmp_path: Path) -> None:
    agent = FakeAgentApi()
    port = free_port()
    runner = await start_api(agent, tmp_path / "agent.sock", f"127.0.0.1:{port}")  # type: ignore[arg-type]
    try:
        async with aiohttp.ClientSession() as tcp, tcp.post(f"http://127.0.0.1:{port}/v1/envoy/restart") as response:
            assert response.status == 403
        assert agent.restarts_started == 0
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(tmp_path / "agent.sock"))) as unix:
            async with unix.post("http://agent/v1/envoy/restart") as response:
                assert response.status == 200 and await response.json() == {"old_pid": 1, "new_pid": 2}
            # A client that gives up: the handover goes on to its end.
            try:
                async with unix.post("http://agent/v1/envoy/restart", timeout=aiohttp.ClientTimeout(total=0.05)):
                    pass
            except TimeoutError:
                pass
        await asyncio.sleep(0.5)
        assert agent.restarts_finished == 2
    finally:
        await runner.cleanup()


async def test_a_resize_takes_a_number_of_workers_and_nothing_else(tmp_path: Path) -> None:
    """Issue 19: `envoy restart --concurrency N`. A typo of 100000 must not start 100,000 threads."""
    agent = FakeAgentApi()
    runner = await start_api(agent, tmp_path / "agent.sock")  # type: ignore[arg-type]
    try:
        connector = aiohttp.UnixConnector(path=str(tmp_path / "agent.sock"))
        async with aiohttp.ClientSession(connector=connector) as unix:
            for bad in ("0", "-1", "two", "100000", "1.5", "%00"):
                async with unix.post(f"http://agent/v1/envoy/restart?concurrency={bad}") as reply:
                    assert reply.status == 400 and "a number of workers from 1 to 1024" in await reply.text(), bad
            assert agent.restarts_started == 0
            async with unix.post("http://agent/v1/envoy/restart?concurrency=2") as reply:
                assert reply.status == 200
        assert agent.concurrency == [2]
    finally:
        await runner.cleanup()


async def test_a_failed_handover_is_503_with_the_reason(tmp_path: Path) -> None:
    runner = await start_api(FakeAgentApi(fail=True), tmp_path / "agent.sock")  # type: ignore[arg-type]
    try:
        connector = aiohttp.UnixConnector(path=str(tmp_path / "agent.sock"))
        async with (
            aiohttp.ClientSession(connector=connector) as unix,
            unix.post("http://agent/v1/envoy/restart") as reply,
        ):
            assert reply.status == 503 and "exited before it was ready" in await reply.text()
    finally:
        await runner.cleanup()


class FakeImpactAgent:
    def __init__(self) -> None:
        self.asked: list[tuple[str, dict[str, str]]] = []

    def policy_impact(self, flows: str, policies: dict[str, str]) -> dict[str, Any]:
        self.asked.append((flows, policies))
        if "bad" in policies:
            raise ValueError("bad:3: spec: not a mapping")
        return {"records": 0, "flips": []}


async def test_impact_is_asked_on_the_unix_socket_only_and_bad_input_is_a_400_naming_the_line(tmp_path: Path) -> None:
    agent = FakeImpactAgent()
    port = free_port()
    runner = await start_api(agent, tmp_path / "agent.sock", f"127.0.0.1:{port}")  # type: ignore[arg-type]
    body = {"flows": "", "policies": {"p.yaml": "x"}}
    try:
        async with (
            aiohttp.ClientSession() as tcp,
            tcp.post(f"http://127.0.0.1:{port}/v1/policy/impact", json=body) as r,
        ):
            assert r.status == 403
        assert agent.asked == []
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(tmp_path / "agent.sock"))) as unix:
            async with unix.post("http://agent/v1/policy/impact", json=body) as response:
                assert response.status == 200 and await response.json() == {"records": 0, "flips": []}
            async with unix.post("http://agent/v1/policy/impact", json={"flows": 3, "policies": {}}) as response:
                assert response.status == 400
            async with unix.post("http://agent/v1/policy/impact", json={"flows": "", "policies": {"bad": ""}}) as r:
                assert r.status == 400 and "bad:3: spec" in await r.text()
    finally:
        await runner.cleanup()
