"""A lean HTTP/1.1 client for one streamed POST (server-sent events), for bench.serve.

NOTE: httpx spends about 140 us of Python per streamed chunk. With 1000 concurrent streams in one
process it topped out near 6,400 chunks/s on the CPU machine, against a raw asyncio server that
only writes chunks, and on the H200 it took 27 s of CPU in a 30 s run: too close to its own limit
to measure a faster server. This client parses in an `asyncio.Protocol`, timestamps each SSE
event when its bytes arrive, and leaves the JSON payloads unparsed until the caller asks (after
the run), so the hot path is a few byte searches per read (7 s of CPU for the same H200 run).

    response = await post_stream("http://localhost:8000/v1/completions", body_bytes, headers)
    response.status, response.events  # events: [(arrival perf_counter, b'{"id": ...}'), ...]
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class HTTPProtocolError(Exception):
    pass


@dataclass
class StreamedResponse:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival time, SSE data payload)
    body: bytes = b""  # the whole body when it is not an event stream (error responses)


class ResponseParser:
    """Incremental parser of one HTTP/1.1 response: status line, headers, then a chunked,
    Content-Length or read-until-close body; an event-stream body is split into SSE events."""

    def __init__(self) -> None:
        self.response = StreamedResponse()
        self.done = False
        self._buf = b""  # bytes not yet parsed at the HTTP framing level
        self._in_headers = True
        self._chunked = False
        self._remaining: int | None = None  # Content-Length left, or the current chunk's bytes left
        self._sse = False
        self._events_buf = b""  # body bytes not yet split into events

    def feed(self, data: bytes, now: float) -> None:
        self._buf += data
        if self._in_headers:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(self._buf[:end].decode("latin-1"))
            self._buf = self._buf[end + 4:]
        if self._chunked:
            self._feed_chunked(now)
        elif self._remaining is not None:
            take = self._buf[:self._remaining]
            self._buf = self._buf[len(take):]
            self._remaining -= len(take)
            self._body(take, now)
            self.done = self._remaining == 0
        else:
            self._body(self._buf, now)
            self._buf = b""

    def connection_closed(self, now: float) -> None:
        """The server closed the connection: a read-until-close body ends here, anything else was cut."""
        if self.done:
            return
        if self._in_headers or self._chunked or self._remaining:
            raise HTTPProtocolError("connection closed before the response ended")
        self._body(b"\n\n", now)  # flush a last event that had no blank line after it
        self.done = True

    def _parse_head(self, head: str) -> None:
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HTTPProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        self.response.status = int(parts[1])
        for line in lines:
            name, _, value = line.partition(":")
            self.response.headers[name.strip().lower()] = value.strip()
        headers = self.response.headers
        self._in_headers = False
        self._sse = headers.get("content-type", "").startswith("text/event-stream")
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not self._chunked and "content-length" in headers:
            self._remaining = int(headers["content-length"])
            self.done = self._remaining == 0

    def _feed_chunked(self, now: float) -> None:
        while not self.done:
            if not self._remaining:  # at a chunk-size line (or the CRLF closing the previous chunk)
                if self._remaining == 0:
                    if len(self._buf) < 2:
                        return
                    self._buf = self._buf[2:]  # the chunk's trailing CRLF
                    self._remaining = None
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(self._buf[:end].split(b";", 1)[0], 16)
                self._buf = self._buf[end + 2:]
                if size == 0:
                    self.done = True  # trailers, if any, are ignored
                    return
                self._remaining = size
            take = self._buf[:self._remaining]
            if not take:
                return
            self._buf = self._buf[len(take):]
            self._remaining -= len(take)
            self._body(take, now)

    def _body(self, data: bytes, now: float) -> None:
        if not self._sse:
            self.response.body += data
            return
        self._events_buf += data
        if b"\r" in self._events_buf:
            self._events_buf = self._events_buf.replace(b"\r\n", b"\n")
        while (end := self._events_buf.find(b"\n\n")) >= 0:
            event, self._events_buf = self._events_buf[:end], self._events_buf[end + 2:]
            data_lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if data_lines:
                self.response.events.append((now, b"\n".join(data_lines)))


class _StreamProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, finished: asyncio.Future[StreamedResponse]) -> None:
        self._request = request
        self._finished = finished
        self._parser = ResponseParser()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed(data, time.perf_counter())
        except (HTTPProtocolError, ValueError) as e:
            self._fail(e)
            return
        if self._parser.done:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._finished.done():
            return
        try:
            self._parser.connection_closed(time.perf_counter())
        except HTTPProtocolError as e:
            self._fail(exc or e)
            return
        self._finish()

    def _finish(self) -> None:
        if not self._finished.done():
            self._finished.set_result(self._parser.response)
        assert self._transport is not None
        self._transport.close()

    def _fail(self, error: BaseException) -> None:
        if not self._finished.done():
            self._finished.set_exception(error)
        if self._transport is not None:
            self._transport.close()


async def post_stream(url: str, body: bytes, headers: dict[str, str] | None = None) -> StreamedResponse:
    """POST `body` (JSON) to an http:// URL on a new connection; returns when the response has ended."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are supported, not {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.hostname}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Accept: text/event-stream", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[StreamedResponse] = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _StreamProtocol(request, finished), parts.hostname, port)
    try:
        return await finished
    finally:
        transport.close()
