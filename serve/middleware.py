"""The app's pure-ASGI middleware: the root path, request-id headers, auth and the body-size limit."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Sequence
from http import HTTPStatus

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import APIError

# Paths the API key guards: vLLM's /v1, and SageMaker's generation route (see BearerAuth).
GUARDED_PREFIXES = ("/v1", "/invocations")


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


class BodySizeLimit:
    """413 for a body over `max_bytes`, by Content-Length up front or while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self) -> APIError:
        return APIError(
            f"Request body is larger than the limit of {self.max_bytes} bytes (--max-request-body-bytes).",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
