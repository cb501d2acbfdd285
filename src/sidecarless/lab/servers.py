"""What lab pods serve: an HTTP server that describes each request it receives, and a TCP echo server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp import web


async def _describe(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    body = {
        "method": request.method,
        # The request target as received, not as aiohttp would normalise it: tests check what Envoy forwarded.
        "path": request.raw_path.partition("?")[0],
        "query": request.raw_path.partition("?")[2],
        "headers": dict(request.headers),
        "client": {"address": peer[0], "port": peer[1]} if peer else None,
        "server": os.environ.get("SIDECARLESS_POD", ""),
    }
    return web.json_response(body)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def serve(http_ports: list[int], tcp_ports: list[int], ready_file: Path | None) -> None:
    runners = []
    for port in http_ports:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", _describe)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", port).start()
        runners.append(runner)
    servers = [await asyncio.start_server(_echo, "0.0.0.0", port) for port in tcp_ports]
    if ready_file is not None:
        ready_file.write_text("ready\n")
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()
        for runner in runners:
            await runner.cleanup()
