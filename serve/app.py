"""The Starlette app: routes, CORS, auth, body limit, error JSON, and the engine's lifespan."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from importlib import metadata
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxllm import tokenizer as tokenization
from serve.chat import create_chat_completion
from serve.completions import create_completion
from serve.engine_client import ServingContext
from serve.errors import APIError
from serve.handling import check_model, parse, read_json
from serve.metrics_text import CONTENT_TYPE, render_metrics
from serve.middleware import BearerAuth, BodySizeLimit
from serve.prompts import chat_prompt
from serve.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from serve.streaming import until_disconnect

logger = logging.getLogger("jaxllm.serve")

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
            except Exception as exc:
                logger.exception("Unhandled error in %s %s", request.method, request.url.path)
                return APIError(f"Internal error: {exc!r}", HTTPStatus.INTERNAL_SERVER_ERROR).response()

        return run

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(ctx, name) for name in ctx.served_model_names]})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        check_model(ctx, name)
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
        tok = ctx.engine.tokenizer
        if isinstance(body, dict) and "messages" in body:
            chat = parse(TokenizeChatRequest, body)
            check_model(ctx, chat.model)
            ids = chat_prompt(
                tok, chat.messages, chat_template=ctx.chat_template, add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=chat.continue_final_message, add_special_tokens=chat.add_special_tokens,
                tools=chat.tools, chat_template_kwargs=chat.chat_template_kwargs,
            ).token_ids
            want_strs = chat.return_token_strs
        else:
            plain = parse(TokenizeCompletionRequest, body)
            check_model(ctx, plain.model)
            ids = tokenization.encode_prompt(tok, plain.prompt, add_special_tokens=plain.add_special_tokens)
            want_strs = plain.return_token_strs
        return JSONResponse({"count": len(ids), "max_model_len": ctx.engine.max_model_len, "tokens": ids,
                             "token_strs": tok.convert_ids_to_tokens(ids) if want_strs else None})

    async def detokenize(request: Request) -> Response:
        req = parse(DetokenizeRequest, await read_json(request))
        check_model(ctx, req.model)
        bad = [t for t in req.tokens if not 0 <= t < ctx.engine.vocab_size]
        if bad:
            raise APIError(f"Token ids {bad[:5]} are out of vocabulary (size {ctx.engine.vocab_size}).",
                           param="tokens")
        return JSONResponse({"prompt": ctx.engine.tokenizer.decode(req.tokens)})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await _maybe_await(ctx.engine.start())
        try:
            yield
        finally:
            await _maybe_await(ctx.engine.shutdown())

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
        "id": name, "object": "model", "created": created, "owned_by": "jaxllm", "root": ctx.model_root,
        "parent": None, "max_model_len": ctx.engine.max_model_len,
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


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value

