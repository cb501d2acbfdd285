"""What lab pods serve: an HTTP server (HTTP/1.0, 1.1 and h2c) that describes each request it receives, and
TCP and UDP echo servers. The HTTP server is hypercorn, the only module that imports it."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def describe(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every method and path with 200 and JSON describing the request as received."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").title()
        headers[key] = f"{headers[key]}, {value.decode('latin-1')}" if key in headers else value.decode("latin-1")
    client = scope.get("client")
    body = {
        "method": scope["method"],
        # The request target as received, not normalised: tests check what Envoy forwarded.
        "path": scope["raw_path"].decode("latin-1").partition("?")[0],
        "query": scope["query_string"].decode("latin-1"),
        "headers": headers,
        "http_version": scope["http_version"],
        "client": {"address": client[0], "port": client[1]} if client else None,
        "server": os.environ.get("SIDECARLESS_POD", ""),
    }
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, address: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, address)  # type: ignore[attr-defined]


async def serve(http_ports: list[int], tcp_ports: list[int], udp_ports: list[int], ready_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    config = Config()
    config.bind = [f"0.0.0.0:{port}" for port in http_ports]
    config.accesslog = None
    config.errorlog = None
    tasks = []
    if http_ports:
        tasks.append(asyncio.create_task(hypercorn_serve(describe, config, shutdown_trigger=stop.wait)))  # type: ignore[arg-type]
    servers = [await asyncio.start_server(_echo, "0.0.0.0", port) for port in tcp_ports]
    for port in udp_ports:
        await loop.create_datagram_endpoint(_UdpEcho, local_addr=("0.0.0.0", port))
    if http_ports:
        await _until_listening(http_ports)
    if ready_file is not None:
        ready_file.write_text("ready\n")
    try:
        await asyncio.Event().wait()
    finally:
        stop.set()
        for server in servers:
            server.close()


async def _until_listening(ports: list[int]) -> None:
    """hypercorn binds in its own task: wait until each port accepts."""
    for port in ports:
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
