"""The lab's load client (lab/load.py) against a server on loopback: it counts answers, wrong verdicts and
failures honestly, replaces politely closed keep-alive connections, and retries only what HTTP clients retry."""

import asyncio
import socket

from sidecarless.lab.load import Expected, Load


async def serve(close_every: int, drop_idle_after: int | None, chunked: bool = False) -> tuple[asyncio.Server, int]:
    """GET /ok -> 200, anything else 403; every `close_every`th answer on a connection says Connection: close;
    after `drop_idle_after` answers a connection is dropped instead of answering its next request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while request := await reader.readline():
                while await reader.readline() not in (b"\r\n", b""):
                    pass
                if drop_idle_after is not None and answered == drop_idle_after:
                    writer.transport.abort()  # a reset, before any byte of the answer
                    return
                method, path = request.split()[:2]
                status = 200 if (method, path) == (b"GET", b"/ok") else 403
                answered += 1
                closing = answered % close_every == 0 or b"close" in request
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n{'Connection: close' if closing else 'X: y'}\r\n\r\nok".encode()
                )
                await writer.drain()
                if closing:
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_every_answer_is_checked_and_polite_closes_cost_nothing() -> None:
    server, port = await serve(close_every=3, drop_idle_after=None)
    async with server:
        load = Load("127.0.0.1", port, rate=200, requests=[Expected("GET", "/ok", 200), Expected("POST", "/x", 403)])
        summary = (await load.run(1.0, asyncio.Event())).summary()
    assert summary["sent"] >= 150 and summary["answered"] == summary["sent"]
    assert summary["failed"] == 0 and summary["wrong"] == 0 and summary["retried"] == 0


async def test_a_wrong_status_is_a_wrong_verdict() -> None:
    server, port = await serve(close_every=100, drop_idle_after=None)
    async with server:
        load = Load("127.0.0.1", port, rate=100, requests=[Expected("GET", "/other", 200)])
        summary = (await load.run(0.5, asyncio.Event())).summary()
    assert summary["wrong"] == summary["answered"] > 0
    assert summary["wrong_verdicts"] == {"GET /other: 403, expected 200": summary["wrong"]}


async def test_a_reset_of_a_reused_connection_is_retried_for_get_only() -> None:
    """The server drops each connection at its third request: a GET goes again on a new connection; a POST
    (not idempotent) fails."""
    server, port = await serve(close_every=100, drop_idle_after=2)
    async with server:
        gets = Load("127.0.0.1", port, rate=100, requests=[Expected("GET", "/ok", 200)], connections=1)
        get_summary = (await gets.run(0.5, asyncio.Event())).summary()
        posts = Load("127.0.0.1", port, rate=100, requests=[Expected("POST", "/x", 403)], connections=1)
        post_summary = (await posts.run(0.5, asyncio.Event())).summary()
    assert get_summary["failed"] == 0 and get_summary["retried"] > 0
    assert (
        post_summary["failed"] > 0
        and post_summary["failures"].get("reset", 0) + post_summary["failures"].get("closed before an answer", 0)
        == post_summary["failed"]
    )


async def test_a_refused_port_is_a_failure_not_a_hang() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    load = Load("127.0.0.1", port, rate=40, requests=[Expected("GET", "/ok", 200)], connections=1)
    summary = (await load.run(0.3, asyncio.Event())).summary()
    assert summary["answered"] == 0 and summary["failures"].get("refused") == summary["sent"] > 0


def test_expected_is_read_from_the_command_line_form() -> None:
    assert Expected.parse("get:/public/ok=200") == Expected("GET", "/public/ok", 200)
    for bad in ("GET/x=200", "GET:x=200", "GET:/x=ok"):
        try:
            Expected.parse(bad)
        except ValueError as error:
            assert "METHOD:PATH=STATUS" in str(error)
        else:
            raise AssertionError(bad)


async def test_chunked_answers_are_read_whole() -> None:
    server, port = await serve(close_every=50, drop_idle_after=None, chunked=True)
    async with server:
        load = Load("127.0.0.1", port, rate=100, requests=[Expected("GET", "/ok", 200), Expected("POST", "/x", 403)])
        summary = (await load.run(0.5, asyncio.Event())).summary()
    assert summary["answered"] == summary["sent"] > 0 and summary["failed"] == summary["wrong"] == 0
