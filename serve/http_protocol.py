"""uvicorn's httptools protocol with the limits it lacks on a request's head (its request line and headers): a
size, a header count, and a deadline. Without them a client can send an endless header (the parser buffers it
all) or hold a connection open sending nothing.

    uvicorn.Config(app, http=http_protocol(args))

A head over a limit gets uvicorn's own answer to a malformed request (400 "Invalid HTTP request received.", the
connection closed), which is what vLLM's h11 server answers past --h11-max-incomplete-event-size. A head not
complete by its deadline gets a 408 and the connection is closed. The body has its own limits
(`serve.middleware.BufferedBody`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.args import ServerArgs

logger = logging.getLogger("jaxllm.serve")

_TIMEOUT_MESSAGE = b"The request's headers did not arrive in time (--request-header-timeout)."
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_MESSAGE), _TIMEOUT_MESSAGE))


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_bytes: int  # the request line and headers (--h11-max-incomplete-event-size)
    max_headers: int  # --h11-max-header-count
    timeout_s: float  # from the connection's start, or a later request's first byte (--request-header-timeout)


class HeadOverLimit(Exception):
    """Raised in a parser callback: the parser stops and uvicorn answers 400."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """One connection. The head's deadline runs while a head is being read; its size counts every byte received
    while the head is incomplete (so a head the parser still buffers counts too) and, exactly, the pieces the
    parser hands over."""

    limits: ClassVar[HeadLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_deadline: asyncio.TimerHandle | None = None  # set while a head is being read
        self.head_bytes = 0  # the parsed pieces of the head being read
        self.head_headers = 0
        self.unparsed_bytes = 0  # bytes received while the head stayed incomplete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._begin_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.head_deadline is None or self.transport.is_closing():
            return
        self.unparsed_bytes += len(data)
        if self.unparsed_bytes > self.limits.max_bytes:
            self._refuse(f"headers over {self.limits.max_bytes} bytes (--h11-max-incomplete-event-size)")
            self.send_400_response("Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begin_head()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url), headers=0)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value), headers=1)

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def _count(self, size: int, headers: int) -> None:
        self.head_bytes += size
        self.head_headers += headers
        if self.head_bytes > self.limits.max_bytes:
            raise HeadOverLimit(self._refuse(
                f"headers over {self.limits.max_bytes} bytes (--h11-max-incomplete-event-size)"))
        if self.head_headers > self.limits.max_headers:
            raise HeadOverLimit(self._refuse(f"more than {self.limits.max_headers} headers (--h11-max-header-count)"))

    def _refuse(self, why: str) -> str:
        logger.info("Refused a request from %s: %s.", self.client, why)
        return why

    def _begin_head(self) -> None:
        self.head_bytes = self.head_headers = self.unparsed_bytes = 0
        if self.head_deadline is None:  # the first request's deadline runs from the connection's start
            self._arm_deadline()

    def _arm_deadline(self) -> None:
        self.head_deadline = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def _end_head(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_timed_out(self) -> None:
        self.head_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # NOTE: a pipelined head waits behind a response still being sent: its deadline starts over.
            self._arm_deadline()
            return
        self._refuse(f"headers not complete within {self.limits.timeout_s:g} s (--request-header-timeout)")
        self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def http_protocol(args: ServerArgs) -> type[BoundedHttpToolsProtocol]:
    """The protocol class uvicorn runs (its `http` option), with `args`' limits."""
    limits = HeadLimits(args.h11_max_incomplete_event_size, args.h11_max_header_count, args.request_header_timeout)
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})
