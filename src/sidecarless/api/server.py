"""The agent's HTTP API on a Unix socket (0660), optionally also on a loopback TCP address.

/livez, /readyz (503 with the pending tasks), /metrics (Prometheus), /v1/status, /v1/policies, /v1/endpoints,
/v1/monitor (a stream of NDJSON events), /v1/policy/hits, /v1/envoy/admin?path=... (Envoy's admin, which is not exposed
anywhere else), /v1/bpf/policy?pod=..., /v1/bpf/maps, /v1/bpf/ct, /v1/bpf/ipcache; and one action,
POST /v1/envoy/restart, on the Unix socket only (its file mode is the access control; loopback TCP is not);
POST /v1/policy/impact likewise.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from sidecarless.envoy.admin import admin_get
from sidecarless.envoy.process import HandoverFailed
from sidecarless.observe.events import Event, EventFilter
from sidecarless.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE


class AgentApi(Protocol):
    """What the API needs of an agent (agent/views.py serves it); the API imports nothing of the agent."""

    @property
    def pending(self) -> list[str]: ...

    @property
    def envoy_admin_socket(self) -> Path: ...

    def status(self) -> dict[str, Any]: ...

    def metrics(self) -> bytes: ...

    def policies(self) -> dict[str, Any]: ...

    def endpoints(self) -> list[dict[str, Any]]: ...

    def identities(self) -> list[dict[str, Any]]: ...

    def subscribe(self) -> asyncio.Queue[Event]: ...

    def recent_events(self) -> list[Event]: ...

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None: ...

    async def sync_monitoring(self) -> None: ...

    def bpf_policy(self, pod: str) -> list[dict[str, Any]] | None: ...

    def bpf_maps(self) -> dict[str, Any]: ...

    def bpf_conntrack(self) -> list[dict[str, Any]]: ...

    def bpf_ipcache(self) -> list[dict[str, Any]]: ...

    async def restart_envoy(self, concurrency: int | None = None) -> dict[str, Any]: ...

    async def policy_hits(self) -> dict[str, Any]: ...

    def policy_impact(self, flows: str, policies: dict[str, str]) -> dict[str, Any]: ...


AGENT_KEY: web.AppKey[AgentApi] = web.AppKey("agent")
MAX_WORKERS = 1024  # `envoy restart --concurrency`: a typo of 100000 must not start 100,000 threads
IMPACT_BODY_MAX = 64 << 20  # a recording of some hundred thousand events, and a policy directory


async def _livez(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    pending = request.app[AGENT_KEY].pending
    if pending:
        return web.Response(status=503, text="".join(f"pending: {task}\n" for task in pending))
    return web.Response(text="ready\n")


async def _status(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    return web.json_response(await asyncio.to_thread(agent.status))


async def _metrics(request: web.Request) -> web.Response:
    exposition = await asyncio.to_thread(request.app[AGENT_KEY].metrics)
    return web.Response(body=exposition, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _policies(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].policies())


async def _endpoints(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT_KEY].endpoints())


async def _identities(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[AGENT_KEY].identities))


async def _monitor(request: web.Request) -> web.StreamResponse:
    """Events as they happen, one JSON object a line, until the client goes away; filtered as `EventFilter`
    says. `last=N`: first the last N recorded events that pass the filters (`hubble observe --last`), then, with
    `follow=1`, what happens next; without it the stream ends there."""
    try:
        event_filter = EventFilter.from_query(request.query.items())
        last = int(request.query.get("last", "0"))
        if last < 0:
            raise ValueError("last must be 0 or more")
    except ValueError as error:
        raise web.HTTPBadRequest(text=f"{error}\n") from None
    follow = request.query.get("follow", "1" if "last" not in request.query else "0") == "1"
    agent = request.app[AGENT_KEY]
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    # Subscribed in the same step as the recorded events are read: none is shown twice, none is missed.
    queue = agent.subscribe() if follow else None
    recorded = [event for event in agent.recent_events() if event_filter.matches(event)][-last:] if last else []
    try:
        if queue is not None:
            await agent.sync_monitoring()  # forwarded requests are logged while somebody watches
        await response.prepare(request)
        for event in recorded:
            await response.write(json.dumps(event.as_dict()).encode() + b"\n")
        while queue is not None:
            event = await queue.get()
            if event_filter.matches(event):
                await response.write(json.dumps(event.as_dict()).encode() + b"\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        if queue is not None:
            agent.unsubscribe(queue)
            await agent.sync_monitoring()
    return response


async def _envoy_admin(request: web.Request) -> web.Response:
    path = request.query.get("path", "/")
    if not path.startswith("/"):
        path = "/" + path  # `envoy admin clusters`, as Envoy's own admin page links it
    status, body = await admin_get(request.app[AGENT_KEY].envoy_admin_socket, path)
    return web.Response(status=status, text=body)


async def _envoy_restart(request: web.Request) -> web.Response:
    _unix_socket_only(request)
    text = request.query.get("concurrency", "")
    if text and not (text.isdigit() and 1 <= int(text) <= MAX_WORKERS):
        raise web.HTTPBadRequest(text=f"concurrency {text!r}: a number of workers from 1 to {MAX_WORKERS}\n")
    # Shielded: a client that goes away must not cancel a handover halfway.
    handover = asyncio.ensure_future(request.app[AGENT_KEY].restart_envoy(int(text) if text else None))
    try:
        return web.json_response(await asyncio.shield(handover))
    except HandoverFailed as error:
        raise web.HTTPServiceUnavailable(text=f"{error}\n") from None


async def _bpf_policy(request: web.Request) -> web.Response:
    pod = request.query.get("pod", "")
    entries = await asyncio.to_thread(request.app[AGENT_KEY].bpf_policy, pod)
    if entries is None:
        raise web.HTTPNotFound(text=f"no pod {pod!r} on this node\n")
    return web.json_response(entries)


async def _policy_hits(request: web.Request) -> web.Response:
    return web.json_response(await request.app[AGENT_KEY].policy_hits())


async def _policy_impact(request: web.Request) -> web.Response:
    """Recorded traffic decided under the policies in force and proposed ones (`policy impact -H`): a question,
    not an action, but its body is large and its work heavy, so it is taken on the Unix socket only."""
    _unix_socket_only(request)
    try:
        body = await request.json()
        flows, policies = body["flows"], body["policies"]
        if not isinstance(flows, str) or not isinstance(policies, dict):
            raise TypeError("flows must be a string and policies a mapping of file name to text")
    except (ValueError, KeyError, TypeError) as error:
        raise web.HTTPBadRequest(text=f"{error}\n") from None
    try:
        return web.json_response(await asyncio.to_thread(request.app[AGENT_KEY].policy_impact, flows, policies))
    except ValueError as error:
        raise web.HTTPBadRequest(text=f"{error}\n") from None


def _unix_socket_only(request: web.Request) -> None:
    transport = request.transport
    if transport is None or transport.get_extra_info("socket").family != socket.AF_UNIX:
        raise web.HTTPForbidden(text="actions are taken on the agent's Unix socket only\n")


async def _bpf_maps(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[AGENT_KEY].bpf_maps))


async def _bpf_ipcache(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[AGENT_KEY].bpf_ipcache))


async def _bpf_conntrack(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[AGENT_KEY].bpf_conntrack))


async def start_api(agent: AgentApi, socket_path: Path, tcp_address: str | None = None) -> web.AppRunner:
    app = web.Application(client_max_size=IMPACT_BODY_MAX)
    app[AGENT_KEY] = agent
    for path, handler in (
        ("/livez", _livez),
        ("/readyz", _readyz),
        ("/metrics", _metrics),
        ("/v1/status", _status),
        ("/v1/policies", _policies),
        ("/v1/endpoints", _endpoints),
        ("/v1/identities", _identities),
        ("/v1/monitor", _monitor),
        ("/v1/envoy/admin", _envoy_admin),
        ("/v1/bpf/policy", _bpf_policy),
        ("/v1/policy/hits", _policy_hits),
        ("/v1/bpf/maps", _bpf_maps),
        ("/v1/bpf/ct", _bpf_conntrack),
        ("/v1/bpf/ipcache", _bpf_ipcache),
    ):
        app.router.add_get(path, handler)
    app.router.add_post("/v1/envoy/restart", _envoy_restart)
    app.router.add_post("/v1/policy/impact", _policy_impact)
    # A monitor stream waits for events: without handler cancellation its handler would outlive the client
    # (keeping per-request logging on) until the next event failed to write, and hold up shutdown.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    socket_path.unlink(missing_ok=True)
    await web.UnixSite(runner, str(socket_path)).start()
    os.chmod(socket_path, 0o660)
    if tcp_address is not None:
        host, _, port = tcp_address.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the agent API listens on loopback only, not {host}")
        await web.TCPSite(runner, host, int(port)).start()
    return runner
