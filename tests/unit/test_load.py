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
    # The first few say when, over which connection, and what the body began with (why, from a proxy).
    assert 0 < len(summary["wrong_answers"]) <= 20
    assert all(" s, keep-alive, " in w or " s, a connection of its own: " in w for w in summary["wrong_answers"])
    assert all(w.endswith(": 403 'ok'") for w in summary["wrong_answers"]), summary["wrong_answers"]


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


async def serve_h2c(goaway_after: int, refuse_instead: bool) -> tuple[asyncio.Server, int]:
    """h2c: GET /ok -> 200, else 403. At the `goaway_after`th request on a connection: a GOAWAY in the same
    write as its answer (a polite close), or, with `refuse_instead`, a GOAWAY saying that stream was not
    processed, and no answer."""
    import h2.config
    import h2.connection
    import h2.events
    from hyperframe.frame import GoAwayFrame

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        connection.initiate_connection()
        writer.write(connection.data_to_send())
        answered = 0
        try:
            while data := await reader.read(65536):
                for event in connection.receive_data(data):
                    if not isinstance(event, h2.events.RequestReceived):
                        continue
                    headers = dict(event.headers)
                    if answered + 1 == goaway_after and refuse_instead:
                        connection.close_connection(last_stream_id=event.stream_id - 2)
                        writer.write(connection.data_to_send())
                        return
                    ok = (headers[b":method"], headers[b":path"]) == (b"GET", b"/ok")
                    connection.send_headers(event.stream_id, [(":status", "200" if ok else "403")], end_stream=True)
                    answered += 1
                    if answered == goaway_after:
                        # As Envoy drains: the GOAWAY first, then the answer to the stream in flight.
                        writer.write(GoAwayFrame(0, last_stream_id=event.stream_id).serialize())
                writer.write(connection.data_to_send())
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_h2c_goaway_is_a_polite_close_and_an_unprocessed_stream_goes_again() -> None:
    """One long-lived h2c connection besides the HTTP/1.1 load (rate 0 here): a GOAWAY arriving with the
    answer in one read ends the connection politely; a stream above the GOAWAY's last stream id is sent
    again on a new connection. Neither is a failure."""
    requests = [Expected("GET", "/ok", 200), Expected("POST", "/x", 403)]
    for refuse, counter in ((False, "h2c_goaways"), (True, "h2c_not_processed")):
        server, port = await serve_h2c(goaway_after=3, refuse_instead=refuse)
        async with server:
            load = Load("127.0.0.1", port, rate=0, requests=requests, h2c_rate=100)
            summary = (await load.run(0.5, asyncio.Event())).summary()
        assert summary["failed"] == 0 and summary["wrong"] == 0, summary
        assert summary["answered"] >= 30 and summary[counter] >= 5, summary
