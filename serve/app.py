"""The Starlette app: routes, CORS, auth, body limit, error JSON, and the engine's lifespan.

Every handler reads one `ServingContext`: the engine client (whose `info` describes the model and its
limits) and the server's flags. Auth and the body limit are pure-ASGI middleware; CORS (starlette's)
wraps both, so a browser's preflight OPTIONS is answered before auth and error responses carry the
CORS headers the browser needs to read them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import metadata
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxllm import tokenizer as tokenization
from jaxllm.engine.client import EngineClient
from jaxllm.validation import out_of_vocab_error
from serve.args import ServerArgs
from serve.chat import create_chat_completion
from serve.completions import create_completion
from serve.errors import APIError
from serve.inputs import chat_prompt, check_model, parse, read_json
from serve.metrics_text import CONTENT_TYPE, render_metrics
from serve.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from serve.streaming import until_disconnect

logger = logging.getLogger("jaxllm.serve")


@dataclass
class ServingContext:
    engine: EngineClient
    args: ServerArgs
    started_at: float = field(default_factory=time.time)

    @property
    def model_name(self) -> str:
        """The name reported in responses: the first served name."""
        return self.engine.info.served_model_names[0]


Handler = Callable[[ServingContext, Request, Any], Awaitable[Response]]


def build_app(ctx: ServingContext) -> Starlette:
    """The ASGI app over one engine. Starts the engine in the lifespan and shuts it down after."""

    def generation(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            body = await read_json(request)
            # NOTE: the body is read before watching for a disconnect, which shares the same receive channel.
            return await until_disconnect(request, handler(ctx, request, body))

        return endpoint

    def guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """One request's bug never takes the server down: it becomes a logged 500 (with CORS headers)."""

        async def run(request: Request) -> Response:
            try:
                return await endpoint(request)
            except APIError:
                raise
            except Exception:
                logger.exception("Unhandled error in %s %s", request.method, request.url.path)
                return APIError("Internal error; see the server's log.", HTTPStatus.INTERNAL_SERVER_ERROR).response()

        return run

    async def models(request: Request) -> Response:
        names = ctx.engine.info.served_model_names
        return JSONResponse({"object": "list", "data": [_model_card(ctx, name) for name in names]})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        check_model(ctx.engine.info.served_model_names, name)
        return JSONResponse(_model_card(ctx, name))

    async def health(request: Request) -> Response:
        return Response(status_code=HTTPStatus.SERVICE_UNAVAILABLE if ctx.engine.is_dead else HTTPStatus.OK)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": _version()})

    async def metrics(request: Request) -> Response:
        text = render_metrics(ctx.engine.metrics(), ctx.model_name, prefix=ctx.args.metrics_names)
        return Response(text, media_type=CONTENT_TYPE)

    async def tokenize(request: Request) -> Response:
        body = await read_json(request)
        info = ctx.engine.info
        tok = info.tokenizer
        if isinstance(body, dict) and "messages" in body:
            chat = parse(TokenizeChatRequest, body)
            check_model(info.served_model_names, chat.model)
            ids = chat_prompt(
                tok, chat.messages, chat_template=info.chat_template, add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=chat.continue_final_message, add_special_tokens=chat.add_special_tokens,
                tools=chat.tools, chat_template_kwargs=chat.chat_template_kwargs,
            ).token_ids
            want_strs = chat.return_token_strs
        else:
            plain = parse(TokenizeCompletionRequest, body)
            check_model(info.served_model_names, plain.model)
            ids = tokenization.encode_prompt(tok, plain.prompt, add_special_tokens=plain.add_special_tokens)
            want_strs = plain.return_token_strs
        return JSONResponse({"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids,
                             "token_strs": tok.convert_ids_to_tokens(ids) if want_strs else None})

    async def detokenize(request: Request) -> Response:
        info = ctx.engine.info
        req = parse(DetokenizeRequest, await read_json(request))
        check_model(info.served_model_names, req.model)
        if (error := out_of_vocab_error(req.tokens, info.vocab_size, "tokens")) is not None:
            raise APIError(error.message, param=error.param)
        return JSONResponse({"prompt": info.tokenizer.decode(req.tokens)})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ctx.engine.start()
        try:
            yield
        finally:
            ctx.engine.shutdown()

    endpoints: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("/v1/models", models, "GET"),
        ("/v1/models/{model:path}", model, "GET"),
        ("/v1/completions", generation(create_completion), "POST"),
        ("/v1/chat/completions", generation(create_chat_completion), "POST"),
        ("/tokenize", tokenize, "POST"),
        ("/detokenize", detokenize, "POST"),
        ("/health", health, "GET"),
        ("/version", version, "GET"),
        ("/metrics", metrics, "GET"),
    ]
    routes = [Route(path, guarded(endpoint), methods=[method]) for path, endpoint, method in endpoints]
    args = ctx.args
    middleware = [
        Middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                   allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials),
        Middleware(BodySizeLimit, max_bytes=args.max_request_body_bytes),
    ]
    if args.api_key:
        middleware.append(Middleware(BearerAuth, api_key=args.api_key))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={APIError: api_error})
    app.state.serving = ctx
    return app


def _model_card(ctx: ServingContext, name: str) -> dict[str, Any]:
    created = int(ctx.started_at)
    return {
        "id": name, "object": "model", "created": created, "owned_by": "jaxllm",
        "root": ctx.engine.info.config.model.model, "parent": None, "max_model_len": ctx.engine.info.max_model_len,
        "permission": [{
            "id": f"modelperm-{name}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
            "group": None, "is_blocking": False,
        }],
    }


def _version() -> str:
    try:
        return metadata.version("jaxllm")
    except metadata.PackageNotFoundError:
        return "unknown"


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
