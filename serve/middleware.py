"""Pure-ASGI middleware: bearer-token auth on /v1/* and a request-body size limit.

CORS (starlette's) wraps both, so a browser's preflight OPTIONS is answered before auth and error
responses carry the CORS headers the browser needs to read them.
"""

from __future__ import annotations

import hashlib
import hmac
from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import APIError


class BearerAuth:
    """401 unless `Authorization: Bearer <key>` on paths under /v1 (vLLM: /health, /metrics stay open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        # NOTE: compare fixed-length digests so the comparison time says nothing about the key's length.
        self.expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _relative_path(scope).startswith("/v1"):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("authorization", "")
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.expected):
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


def _relative_path(scope: Scope) -> str:
    """The path below root_path (uvicorn puts root_path into `path` as well)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
