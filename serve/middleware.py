"""The app's pure-ASGI middleware: the root path, request-id headers, auth, reading the body (size limit and
deadline), and ending the requests still running when the shutdown deadline expires."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import APIError
from serve.streaming import SSE_DONE

_SSE_DONE_BYTES = SSE_DONE.encode()

logger = logging.getLogger("jaxllm.serve")

# Paths the API key guards: vLLM's /v1, and SageMaker's generation route (see BearerAuth).
GUARDED_PREFIXES = ("/v1", "/invocations", "/dashboard/data")


def route_path(scope: Scope) -> str:
    """The path below root_path, as the router matches it: `/llm/v1/models` and `/v1/models` alike under /llm."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class RootPath:
    """Serves the app under `root_path` as vLLM's FastAPI app does: a request that carries the prefix
    (`/llm/v1/...`) and one a path-stripping proxy forwards (`/v1/...`) reach the same route."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "root_path": self.root_path}
        await self.app(scope, receive, send)


class RequestIdHeaders:
    """`X-Request-Id` on every response: the request's own, else a new random id (vLLM's
    --enable-request-id-headers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(raw=message["headers"]).append("X-Request-Id", request_id)
            await send(message)

        await self.app(scope, receive, send_with_request_id)


class BearerAuth:
    """401 unless `Authorization: Bearer <key>` on GUARDED_PREFIXES (vLLM: /health, /metrics stay open).

    NOTE: vLLM 0.34 leaves /invocations open; here it is guarded: it generates as /v1 does, and an open
    route beside a key would make the key pointless."""

    def __init__(self, app: ASGIApp, api_keys: Sequence[str]) -> None:
        self.app = app
        # NOTE: compare fixed-length digests so the comparison time says nothing about the keys' lengths.
        self.expected = [hashlib.sha256(f"Bearer {key}".encode()).digest() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not route_path(scope).startswith(
                GUARDED_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = hashlib.sha256(Headers(scope=scope).get("authorization", "").encode()).digest()
        if not any([hmac.compare_digest(given, key) for key in self.expected]):  # a list: every key is compared
            response = APIError("Unauthorized: missing or wrong API key.", HTTPStatus.UNAUTHORIZED).response()
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BufferedBody:
    """Reads the whole request body before the app sees the request, so no handler (and no engine) meets a
    half-sent one: 413 over `max_bytes` (by Content-Length up front, else counted as it streams in, so chunked
    bodies too), 408 when it has not all arrived `timeout_s` after the headers, and a client that leaves
    mid-upload ends the request with one debug line.

    NOTE: one deadline for the whole body, not an idle time between chunks: a client sending a byte every few
    seconds would hold the connection and its buffer forever under an idle timeout."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _closing(self._too_large())(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            logger.info("%s %s: the request body did not arrive within %g s; answered 408.", scope["method"],
                        scope["path"], self.timeout_s)
            await _closing(APIError(
                f"The request body did not arrive within {self.timeout_s:g} s (--request-body-timeout).",
                HTTPStatus.REQUEST_TIMEOUT))(scope, receive, send)
            return
        except APIError as e:
            await _closing(e)(scope, receive, send)
            return
        if body is None:
            logger.debug("%s %s: the client disconnected while sending the request body.", scope["method"],
                         scope["path"])
            return
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay_receive, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The body, or None when the client disconnects first."""
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(
            f"Request body is larger than the limit of {self.max_bytes} bytes (--max-request-body-bytes).",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )


def _closing(error: APIError) -> JSONResponse:
    """The error's response, closing the connection: the rest of the body is never read."""
    response = error.response()
    response.headers["Connection"] = "close"
    return response


class ShutdownDeadline:
    """The end of --shutdown-timeout: `expire()` cancels every request still running, and each one's
    `EndAtShutdownDeadline` answers it in a form its client can read."""

    message = "The server is shutting down and --shutdown-timeout expired before this request finished."

    def __init__(self) -> None:
        self.expired = False
        self.running: set[asyncio.Task[Any]] = set()

    def expire(self) -> int:
        """Cancel the running requests; how many there were."""
        self.expired = True
        for task in self.running:
            task.cancel()
        return len(self.running)


@dataclass
class _ResponseProgress:
    """What of a response has been sent: its start, whether it is an event stream, its last body chunk."""

    started: bool = False
    event_stream: bool = False
    events_done: bool = False  # the last chunk ended with `data: [DONE]`
    complete: bool = False


class EndAtShutdownDeadline:
    """Ends the requests still running when the ShutdownDeadline expires as clients can read them, not as cut
    connections: a stream gets vLLM's error JSON as an SSE event and `data: [DONE]`, a request not yet answered
    (queued, or generating a whole reply) gets a 503 with the error JSON. Nothing is logged per request."""

    def __init__(self, app: ASGIApp, deadline: ShutdownDeadline) -> None:
        self.app = app
        self.deadline = deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        progress = _ResponseProgress()

        async def tracking_send(message: Message) -> None:
            await send(message)
            # NOTE: marked once sent: a cancel that lands inside `send` (waiting to write) sent nothing.
            if message["type"] == "http.response.start":
                progress.started = True
                content_type = Headers(raw=message["headers"]).get("content-type", "")
                progress.event_stream = content_type.startswith("text/event-stream")
            elif message["type"] == "http.response.body":
                progress.events_done = message.get("body", b"").endswith(_SSE_DONE_BYTES)
                progress.complete = not message.get("more_body", False)

        self.deadline.running.add(task)
        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self.deadline.expired:
                raise
            task.uncancel()
        finally:
            self.deadline.running.discard(task)
        if self.deadline.expired and not progress.complete:
            await self._end(progress, scope, receive, send)

    async def _end(self, progress: _ResponseProgress, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(self.deadline.message, HTTPStatus.SERVICE_UNAVAILABLE)
        if not progress.started:
            await error.response()(scope, receive, send)
        elif progress.event_stream:
            events = "" if progress.events_done else error.sse_event() + SSE_DONE
            await send({"type": "http.response.body", "body": events.encode(), "more_body": False})
        # NOTE: a whole (not streamed) reply cut mid-body cannot be mended; the server closes its connection.
