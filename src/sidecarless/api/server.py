"""The agent's HTTP API on a Unix socket (0660): /livez, /readyz, /metrics, /v1/status."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sidecarless.agent import Agent

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")


async def _livez(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    pending = request.app[AGENT_KEY].state.pending
    if pending:
        return web.Response(status=503, text="".join(f"pending: {task}\n" for task in pending))
    return web.Response(text="ready\n")


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].status())


async def _metrics(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    agent.refresh_gauges()
    return web.Response(body=agent.metrics.exposition(), content_type="text/plain", charset="utf-8")


async def start_api(agent: Agent, socket_path: Path) -> web.AppRunner:
    app = web.Application()
    app[AGENT_KEY] = agent
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    socket_path.unlink(missing_ok=True)
    await web.UnixSite(runner, str(socket_path)).start()
    os.chmod(socket_path, 0o660)
    return runner
