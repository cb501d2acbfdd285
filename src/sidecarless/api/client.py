"""Talking to an agent's API over its Unix socket (synchronous: the CLI and the lab use it)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class AgentUnreachable(Exception):
    """No agent answers on the socket (not started yet, or gone); retrying may help."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout_s: float | None) -> None:
        super().__init__("agent", timeout=timeout_s)
        self._socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._socket_path))


def agent_get(socket_path: Path, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
    return _request(socket_path, "GET", path, timeout_s)


def agent_post(socket_path: Path, path: str, timeout_s: float = 2.0, body: Any = None) -> tuple[int, str]:
    """An action (`/v1/envoy/restart`), or a question with a JSON body (`/v1/policy/impact`)."""
    return _request(socket_path, "POST", path, timeout_s, body)


def _request(socket_path: Path, method: str, path: str, timeout_s: float, body: Any = None) -> tuple[int, str]:
    connection = _UnixConnection(socket_path, timeout_s)
    try:
        if body is None:
            connection.request(method, path)
        else:
            connection.request(method, path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    except OSError as error:
        raise AgentUnreachable(f"{socket_path}: {error}") from None
    finally:
        connection.close()


def agent_status(socket_path: Path) -> dict[str, Any]:
    _, body = agent_get(socket_path, "/v1/status")
    status: dict[str, Any] = json.loads(body)
    return status


def agent_stream(socket_path: Path, path: str) -> Iterator[str]:
    """Lines of a streaming endpoint (/v1/monitor), as they come."""
    connection = _UnixConnection(socket_path, timeout_s=None)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        if response.status != 200:
            raise AgentUnreachable(f"{path}: {response.status} {response.read().decode().strip()}")
        while line := response.readline():
            yield line.decode().rstrip("\n")
    except OSError as error:
        raise AgentUnreachable(f"{socket_path}: {error}") from None
    finally:
        connection.close()
