"""A steady HTTP/1.1 load with every answer checked (`lab load`, run inside a pod): what "no request failed"
is measured with while the lab restarts Envoy or the agent (issue 16).

With `h2c_rate`, one long-lived HTTP/2 connection (prior knowledge) besides: requests one after another on it;
a GOAWAY is a polite close (the stream in flight completes, the next goes on a new connection); a stream the
GOAWAY says was not processed (id above its last stream id) is sent again on a new connection, as RFC 9113
6.8 allows; a reset stream or a connection lost mid-stream is a failure.

Half the rate goes over keep-alive connections (each sends its next request when the previous one is answered,
paced), half over a new connection per request (`Connection: close`). Each request is the next of `requests` in
turn, and its status must be the expected one: anything else is a wrong verdict; no answer is a failure, by
reason. A keep-alive connection the server closed politely (`Connection: close` on a response) is replaced; a
reused connection that closes or resets before any byte of the answer is retried once on a new connection for
an idempotent method, as HTTP clients do (RFC 9110 9.2.2), and counted as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

REQUEST_TIMEOUT_S = 5.0
FAILURE_TIMES_KEPT = 20
IDEMPOTENT = {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}


@dataclass(frozen=True)
class Expected:
    method: str
    path: str
    status: int

    @staticmethod
    def parse(text: str) -> Expected:
        """METHOD:PATH=STATUS, e.g. GET:/public/ok=200."""
        request, _, status = text.rpartition("=")
        method, _, path = request.partition(":")
        if not (method and path.startswith("/") and status.isdigit()):
            raise ValueError(f"{text!r}: want METHOD:PATH=STATUS, e.g. GET:/public/ok=200")
        return Expected(method.upper(), path, int(status))


@dataclass
class LoadReport:
    sent: int = 0
    answered: int = 0
    wrong: Counter[str] = field(default_factory=Counter)  # "GET /x: 403, expected 200"
    failed: Counter[str] = field(default_factory=Counter)  # reason -> count
    failed_at_s: list[float] = field(default_factory=list)  # when (from the start), the first few
    # The first few wrong answers: when, over which kind of connection, and the start of the body (a proxy's
    # own answer says why there, e.g. Envoy's "upstream connect error or disconnect/reset before headers").
    wrong_answers: list[str] = field(default_factory=list)
    failed_after_mark: int = 0  # failures of requests sent after the mark
    started_at: float = field(default_factory=time.monotonic)
    retried: int = 0  # stale keep-alive connections whose request went again on a new one
    closed_politely: int = 0  # keep-alive connections the server ended with `Connection: close` on an answer
    h2c_goaways: int = 0  # HTTP/2 connections the server ended with GOAWAY
    h2c_not_processed: int = 0  # streams a GOAWAY said were not processed, sent again on a new connection
    latencies_ms: list[float] = field(default_factory=list)
    latencies_before_mark_ms: list[float] = field(default_factory=list)  # of requests sent before the mark
    latencies_after_mark_ms: list[float] = field(default_factory=list)  # and after it
    marked_at: float | None = None  # `mark()`: when something happened (SIGUSR1 to `lab load`)
    first_answer_after_mark_ms: float | None = None  # the first answer to a request sent after the mark

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        marked = self.marked_at is not None

        return {
            "sent": self.sent,
            "answered": self.answered,
            "failed": sum(self.failed.values()),
            "failures": dict(self.failed),
            "failed_at_s": self.failed_at_s,
            "failed_after_mark": self.failed_after_mark,
            "wrong": sum(self.wrong.values()),
            "wrong_verdicts": dict(self.wrong),
            "wrong_answers": self.wrong_answers,
            "retried": self.retried,
            "closed_politely": self.closed_politely,
            "h2c_goaways": self.h2c_goaways,
            "h2c_not_processed": self.h2c_not_processed,
            "p50_ms": round(statistics.median(ordered), 2) if ordered else 0.0,
            "p99_ms": _percentile(ordered, 0.99),
            "max_ms": round(ordered[-1], 2) if ordered else 0.0,
            "p99_before_mark_ms": _percentile(sorted(self.latencies_before_mark_ms), 0.99) if marked else None,
            "p99_after_mark_ms": _percentile(sorted(self.latencies_after_mark_ms), 0.99) if marked else None,
            "first_answer_after_mark_ms": self.first_answer_after_mark_ms,
        }


def _percentile(ordered: list[float], fraction: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))], 2) if ordered else 0.0


class _Closed(Exception):
    """The connection ended before any byte of the answer."""


class _BadAnswer(Exception):
    """What came back is not an HTTP/1.1 answer."""


class _NotProcessed(Exception):
    """A GOAWAY said the stream was not processed: safe to send again."""


class _StreamReset(Exception):
    """The server reset the stream."""


GOAWAY_FRAME = 0x7


def _complete_frames(buffer: bytearray) -> list[bytes]:
    """The whole HTTP/2 frames at the start of `buffer`, taken out of it (9-byte header, 24-bit length)."""
    frames = []
    while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
        size = 9 + int.from_bytes(buffer[:3], "big")
        frames.append(bytes(buffer[:size]))
        del buffer[:size]
    return frames


class _H2cConnection:
    """One HTTP/2 connection with prior knowledge (h2c), one stream at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host
        self.connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.connection.initiate_connection()
        self.going_away = False
        self._buffer = bytearray()

    async def request(self, expected: Expected) -> int:
        stream_id = self.connection.get_next_available_stream_id()
        headers = [(":method", expected.method), (":path", expected.path), (":scheme", "http"),
                   (":authority", self.host)]  # fmt: skip
        self.connection.send_headers(stream_id, headers, end_stream=True)
        self.writer.write(self.connection.data_to_send())
        await self.writer.drain()
        status: int | None = None
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise _Closed if status is None else asyncio.IncompleteReadError(b"", None)
            self._buffer.extend(data)
            frames = _complete_frames(self._buffer)
            # h2 refuses every frame after a GOAWAY it has read, though the server goes on answering the streams
            # the GOAWAY covers (in the same read or later ones): GOAWAY frames are read here, not by h2.
            for frame in frames:
                if frame[3] == GOAWAY_FRAME:
                    self.going_away = True
                    if int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF < stream_id:
                        raise _NotProcessed
            ended = False
            for event in self.connection.receive_data(b"".join(f for f in frames if f[3] != GOAWAY_FRAME)):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    raise _StreamReset
                ended = ended or (isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id)
            self.writer.write(self.connection.data_to_send())
            if ended:
                if status is None:
                    raise _BadAnswer(b"a stream ended without a status")
                return status


@dataclass(frozen=True)
class _Answer:
    status: int
    closing: bool  # the server will close the connection
    body_start: bytes = b""


BODY_KEPT = 160


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, expected: Expected, close: bool
) -> _Answer:
    """One request and its answer."""
    connection = "close" if close else "keep-alive"
    writer.write(
        f"{expected.method} {expected.path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise _Closed
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise _BadAnswer(status_line[:80])
    length, chunked, closing = 0, False, close
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and value == "chunked":
            chunked = True
        elif name == "connection" and value == "close":
            closing = True
    body = b""
    if chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:size][: BODY_KEPT - len(body)]
        while await reader.readline() not in (b"\r\n", b""):  # trailers
            pass
    elif length:
        body = (await reader.readexactly(length))[:BODY_KEPT]
    return _Answer(int(parts[1]), closing, body)


class Load:
    def __init__(
        self,
        host: str,
        port: int,
        rate: float,
        requests: list[Expected],
        connections: int = 4,
        h2c_rate: float = 0.0,
    ) -> None:
        self.host, self.port, self.rate, self.requests = host, port, rate, requests
        self.connections = connections
        self.h2c_rate = h2c_rate
        self.report = LoadReport()
        self._next = 0

    def _take(self) -> Expected:
        expected = self.requests[self._next % len(self.requests)]
        self._next += 1
        return expected

    def mark(self) -> None:
        """Note now (e.g. when Envoy was killed): the summary says how soon a request sent after it was answered."""
        self.report.marked_at, self.report.first_answer_after_mark_ms = time.monotonic(), None
        self.report.latencies_before_mark_ms = list(self.report.latencies_ms)
        self.report.latencies_after_mark_ms = []

    def _record(self, expected: Expected, status: int, started: float, how: str, body_start: bytes = b"") -> None:
        now = time.monotonic()
        self.report.answered += 1
        self.report.latencies_ms.append((now - started) * 1000)
        marked = self.report.marked_at
        if marked is not None:
            after = started >= marked
            (self.report.latencies_after_mark_ms if after else self.report.latencies_before_mark_ms).append(
                (now - started) * 1000
            )
        if marked is not None and started >= marked and self.report.first_answer_after_mark_ms is None:
            self.report.first_answer_after_mark_ms = round((now - marked) * 1000, 1)
        if status != expected.status:
            self.report.wrong[f"{expected.method} {expected.path}: {status}, expected {expected.status}"] += 1
            if len(self.report.wrong_answers) < FAILURE_TIMES_KEPT:
                at = round(now - self.report.started_at, 3)
                body = body_start.decode("latin-1").strip()
                self.report.wrong_answers.append(f"{at} s, {how}: {status} {body!r}")

    def _fail(self, error: BaseException, started: float) -> None:
        reason = {
            ConnectionRefusedError: "refused",
            ConnectionResetError: "reset",
            TimeoutError: "timeout",
            _Closed: "closed before an answer",
            asyncio.IncompleteReadError: "closed mid-answer",
            ValueError: "closed mid-answer",  # a chunk size or length cut short
            _BadAnswer: "not an HTTP answer",
            _StreamReset: "stream reset",
            _NotProcessed: "not processed twice",
        }.get(type(error), type(error).__name__)
        self.report.failed[reason] += 1
        if self.report.marked_at is not None and started >= self.report.marked_at:
            self.report.failed_after_mark += 1
        if len(self.report.failed_at_s) < FAILURE_TIMES_KEPT:
            self.report.failed_at_s.append(round(time.monotonic() - self.report.started_at, 3))

    async def run(self, duration_s: float, stop: asyncio.Event) -> LoadReport:
        deadline = time.monotonic() + duration_s
        tasks = []
        if self.rate:
            tasks = [asyncio.create_task(self._keep_alive(deadline, stop)) for _ in range(self.connections)]
            tasks.append(asyncio.create_task(self._new_connections(deadline, stop)))
        if self.h2c_rate:
            tasks.append(asyncio.create_task(self._h2c(deadline, stop)))
        await asyncio.gather(*tasks)
        return self.report

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(self.host, self.port), REQUEST_TIMEOUT_S)

    async def _keep_alive(self, deadline: float, stop: asyncio.Event) -> None:
        """One keep-alive connection at rate/2/connections requests a second."""
        interval = self.connections * 2 / self.rate
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        next_at = time.monotonic()
        while time.monotonic() < deadline and not stop.is_set():
            next_at += interval
            expected, started = self._take(), time.monotonic()
            self.report.sent += 1
            if connection is not None and (connection[0].at_eof() or connection[1].is_closing()):
                _close(connection)  # the server closed it meanwhile: as HTTP clients do, not reused
                connection = None
            reused = connection is not None
            try:
                if connection is None:
                    connection = await self._open()
                try:
                    answer = await asyncio.wait_for(
                        _exchange(*connection, self.host, expected, close=False), REQUEST_TIMEOUT_S
                    )
                except (_Closed, ConnectionResetError):
                    if not (reused and expected.method in IDEMPOTENT):
                        raise
                    _close(connection)
                    self.report.retried += 1
                    connection, reused = await self._open(), False
                    answer = await asyncio.wait_for(
                        _exchange(*connection, self.host, expected, close=False), REQUEST_TIMEOUT_S
                    )
                how = "keep-alive, reused" if reused else "keep-alive, new"
                self._record(expected, answer.status, started, how, answer.body_start)
                if answer.closing:
                    self.report.closed_politely += 1
                    _close(connection)
                    connection = None
            except (OSError, TimeoutError, _Closed, _BadAnswer, asyncio.IncompleteReadError, ValueError) as error:
                self._fail(error, started)
                if connection is not None:
                    _close(connection)
                connection = None
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if connection is not None:
            _close(connection)

    async def _h2c(self, deadline: float, stop: asyncio.Event) -> None:
        """One long-lived h2c connection, replaced only when the server ends it (or it fails)."""
        connection: _H2cConnection | None = None
        next_at = time.monotonic()
        while time.monotonic() < deadline and not stop.is_set():
            next_at += 1 / self.h2c_rate
            expected, started = self._take(), time.monotonic()
            self.report.sent += 1
            try:
                if connection is None:
                    connection = _H2cConnection(*await self._open(), self.host)
                try:
                    status = await asyncio.wait_for(connection.request(expected), REQUEST_TIMEOUT_S)
                except _NotProcessed:
                    self.report.h2c_not_processed += 1
                    self.report.h2c_goaways += 1
                    _close((connection.reader, connection.writer))
                    connection = _H2cConnection(*await self._open(), self.host)
                    status = await asyncio.wait_for(connection.request(expected), REQUEST_TIMEOUT_S)
                self._record(expected, status, started, "h2c")
                if connection.going_away:
                    self.report.h2c_goaways += 1
                    _close((connection.reader, connection.writer))
                    connection = None
            except (OSError, TimeoutError, _Closed, _BadAnswer, _StreamReset, _NotProcessed,
                    asyncio.IncompleteReadError, h2.exceptions.ProtocolError) as error:  # fmt: skip
                self._fail(error, started)
                if connection is not None:
                    _close((connection.reader, connection.writer))
                connection = None
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if connection is not None:
            _close((connection.reader, connection.writer))

    async def _new_connections(self, deadline: float, stop: asyncio.Event) -> None:
        """A new connection per request, rate/2 a second, each in its own task (they overlap)."""
        interval = 2 / self.rate
        next_at, running = time.monotonic(), set()
        while time.monotonic() < deadline and not stop.is_set():
            next_at += interval
            task = asyncio.create_task(self._one_connection(self._take()))
            running.add(task)
            task.add_done_callback(running.discard)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if running:
            await asyncio.gather(*running)

    async def _one_connection(self, expected: Expected) -> None:
        started = time.monotonic()
        self.report.sent += 1
        connection = None
        try:
            connection = await self._open()
            answer = await asyncio.wait_for(_exchange(*connection, self.host, expected, close=True), REQUEST_TIMEOUT_S)
            self._record(expected, answer.status, started, "a connection of its own", answer.body_start)
        except (OSError, TimeoutError, _Closed, _BadAnswer, asyncio.IncompleteReadError, ValueError) as error:
            self._fail(error, started)
        finally:
            if connection is not None:
                _close(connection)


def _close(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    with contextlib.suppress(OSError):
        connection[1].close()
