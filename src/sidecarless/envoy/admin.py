"""Envoy's admin interface, reached over its Unix socket."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp


async def admin_get(admin_socket: Path, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """GET an admin path (`/ready`, `/stats?filter=...`); (status, body)."""
    connector = aiohttp.UnixConnector(path=str(admin_socket))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
        session.get(f"http://envoy{path}") as response,
    ):
        return response.status, await response.text()


async def admin_post(admin_socket: Path, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
    """POST an admin path (`/runtime_modify?key=value`); (status, body). OSError when Envoy cannot be reached."""
    connector = aiohttp.UnixConnector(path=str(admin_socket))
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.post(f"http://envoy{path}") as response,
        ):
            return response.status, await response.text()
    except aiohttp.ClientError as error:
        raise OSError(f"envoy admin {path}: {error}") from error


async def stat_value(admin_socket: Path, name: str) -> int:
    """One counter or gauge by exact name; 0 if Envoy does not have it (yet)."""
    # The filter is a regular expression, and a listener on [::] has brackets in its name: every character but
    # a word character matches any (nothing to escape in the URL); the exact name is picked below.
    pattern = re.sub(r"\W", ".", name)
    _, body = await admin_get(admin_socket, f"/stats?filter=^{pattern}$")
    for line in body.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0
