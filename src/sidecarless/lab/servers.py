"""What lab pods serve: an HTTP server (HTTP/1.0, 1.1 and h2c) that describes each request it receives, and
TCP and UDP echo servers. The HTTP server is hypercorn, the only module that imports it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
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


IPV4_ONLY = ("0.0.0.0",)


def _bound_socket(host: str, port: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    """A socket of one family: an IPv6 one takes IPv6 only, so the IPv4 one can share the port. TCP ones
    listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bound = socket.socket(family, kind)
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        bound.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    bound.bind((host, port))
    if kind == socket.SOCK_STREAM:
        bound.listen(1024)
    return bound


async def serve(
    http_ports: list[int],
    tcp_ports: list[int],
    udp_ports: list[int],
    ready_file: Path | None,
    hosts: tuple[str, ...] = IPV4_ONLY,
) -> None:
    """`hosts`: the wildcard address of each family the pod has ("0.0.0.0", "::")."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    config = Config()
    # Sockets made here, one per family, handed to hypercorn by descriptor.
    http_sockets = [_bound_socket(host, port) for port in http_ports for host in hosts]
    config.bind = [f"fd://{listener.fileno()}" for listener in http_sockets]
    config.accesslog = None
    config.errorlog = None
    tasks = []
    if http_ports:
        tasks.append(asyncio.create_task(hypercorn_serve(describe, config, shutdown_trigger=stop.wait)))  # type: ignore[arg-type]
    servers = [
        await asyncio.start_server(_echo, sock=_bound_socket(host, port)) for port in tcp_ports for host in hosts
    ]
    for port in udp_ports:
        for host in hosts:
            await loop.create_datagram_endpoint(_UdpEcho, sock=_bound_socket(host, port, socket.SOCK_DGRAM))
    if ready_file is not None:
        ready_file.write_text("ready\n")
    try:
        await asyncio.Event().wait()
    finally:
        stop.set()
        for server in servers:
            server.close()
