"""The Starlette app: routes, middleware, error JSON, and the engine's lifespan.

Every handler reads one `ServingContext`: the engine client (whose `info` describes the model and its
limits) and the server's flags. The middleware (`serve.middleware`, `serve.load`) wraps the routes, outermost
first: the root path, X-Request-Id, CORS (starlette's: a browser's preflight OPTIONS is answered before auth,
and error responses carry the CORS headers the browser needs to read them), the end at the shutdown deadline,
auth, reading the body (size limit and deadline), and the in-flight count. Every error, 404 and 405 included,
is vLLM's error JSON.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import metadata
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxllm.engine.client import EngineClient
from serve import prompt_jobs
from serve.args import ServerArgs
from serve.batch_chat import create_batch_chat_completion
from serve.chat import create_chat_completion
from serve.completions import create_completion
from serve.dashboard import Dashboard
from serve.errors import APIError, internal_error
from serve.inputs import chat_prompt, check_model, parse
from serve.invocations import create_invocation
from serve.load import LOAD_REPORT_FORMAT_HEADER, ServerLoad, load_report_header
from serve.middleware import (
    BearerAuth,
    BufferedBody,
    EndAtShutdownDeadline,
    RequestIdHeaders,
    RootPath,
    ShutdownDeadline,
)
from serve.prometheus_metrics import metrics_registry, render_metrics
from serve.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from serve.render_pool import RenderPool
from serve.request_body import read_json
from serve.request_bounds import RequestBounds
from serve.streaming import until_disconnect
from serve.tokenizer_info import tokenizer_info

logger = logging.getLogger("jaxllm.serve")


@dataclass
class ServingContext:
    engine: EngineClient
    args: ServerArgs
    started_at: float = field(default_factory=time.time)
    load: ServerLoad = field(default_factory=ServerLoad)  # counted with --enable-server-load-tracking
    shutdown: ShutdownDeadline = field(default_factory=ShutdownDeadline)  # expired by `jaxllm.serve.run_server`

    render_pool: RenderPool = field(init=False)  # prompts rendered and tokenized off the event loop

    def __post_init__(self) -> None:
        self.render_pool = RenderPool(self.engine.info.tokenizer, self.args.prompt_processes)

    @property
    def model_name(self) -> str:
        """The name reported in responses: the first served name."""
        return self.engine.info.served_model_names[0]


Handler = Callable[[ServingContext, Request, Any], Awaitable[Response]]


def build_app(ctx: ServingContext) -> Starlette:
    """The ASGI app over one engine. Starts the engine in the lifespan and shuts it down after."""
    bounds = RequestBounds.of(ctx.args, ctx.engine.info.vocab_size)  # the limits of every request body

    def generation(handler: Handler, *, load_report: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """`load_report`: a whole (not streamed) reply carries the ORCA load header when the request asks."""

        async def endpoint(request: Request) -> Response:
            body = await read_json(request, bounds)
            # NOTE: the body is read before watching for a disconnect, which shares the same receive channel.
            response = await until_disconnect(request, handler(ctx, request, body))
            report_format = request.headers.get(LOAD_REPORT_FORMAT_HEADER)
            if (load_report and report_format and response.status_code == HTTPStatus.OK
                    and not isinstance(response, StreamingResponse)):
                response.headers.update(load_report_header(report_format, ctx.engine.metrics()))
            return response

        return endpoint

    def guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """One request's bug never takes the server down: it becomes a logged 500 (with CORS headers)."""

        async def run(request: Request) -> Response:
            try:
                return await endpoint(request)
            except APIError:
                raise
            except Exception as e:
                return internal_error(f"Unhandled error in {request.method} {request.url.path}", e).response()

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

    async def load(request: Request) -> Response:
        return JSONResponse({"server_load": ctx.load.in_flight})

    async def show_tokenizer_info(request: Request) -> Response:
        return JSONResponse(tokenizer_info(ctx.engine.info.tokenizer, ctx.engine.info.chat_template))

    registry = metrics_registry(ctx.engine.metrics, ctx.model_name, ctx.args.metrics_names)

    async def metrics(request: Request) -> Response:
        body, content_type = render_metrics(registry, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    async def tokenize(request: Request) -> Response:
        """Open under --api-key, as vLLM's: its work runs on the render pool, off the event loop."""
        body = await read_json(request, bounds)
        info = ctx.engine.info
        if isinstance(body, dict) and "messages" in body:
            chat = parse(TokenizeChatRequest, body)
            check_model(info.served_model_names, chat.model)
            ids = (await chat_prompt(
                ctx.render_pool, chat.messages, limit=None, chat_template=info.chat_template,
                add_generation_prompt=chat.add_generation_prompt, continue_final_message=chat.continue_final_message,
                add_special_tokens=chat.add_special_tokens, tools=chat.tools,
                chat_template_kwargs=chat.chat_template_kwargs,
            )).token_ids
            reply = await ctx.render_pool.run(prompt_jobs.tokens_reply, ids, weight=len(ids) * 8,
                                              max_model_len=info.max_model_len,
                                              with_token_strs=bool(chat.return_token_strs))
        else:
            plain = parse(TokenizeCompletionRequest, body)
            check_model(info.served_model_names, plain.model)
            reply = await ctx.render_pool.run(prompt_jobs.tokenize_reply, plain.prompt, weight=len(plain.prompt),
                                              add_special_tokens=plain.add_special_tokens,
                                              max_model_len=info.max_model_len,
                                              with_token_strs=bool(plain.return_token_strs))
        return Response(reply, media_type="application/json")

    async def detokenize(request: Request) -> Response:
        info = ctx.engine.info
        req = parse(DetokenizeRequest, await read_json(request, bounds))
        check_model(info.served_model_names, req.model)
        try:
            text = await ctx.render_pool.run(prompt_jobs.detokenize, req.tokens, info.vocab_size,
                                             weight=len(req.tokens) * 8)
        except prompt_jobs.OutOfVocabError as e:
            raise APIError(str(e), param="tokens") from e
        return JSONResponse({"prompt": text})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def unhandled_error(request: Request, exc: Exception) -> Response:
        """A bug outside the routes (in a middleware): starlette's outermost handler answers it with this, then
        re-raises it for uvicorn's log."""
        return internal_error(f"Unhandled error in {request.method} {request.url.path}", exc).response()

    async def http_error(request: Request, exc: Exception) -> Response:
        """The router's 404 and 405, as vLLM's: the status phrase as `type` (405 keeps its Allow header)."""
        assert isinstance(exc, HTTPException)
        response = APIError(exc.detail, exc.status_code, type=HTTPStatus(exc.status_code).phrase).response()
        response.headers.update(exc.headers or {})
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ctx.engine.start()
        try:
            async with dashboard.history.sampling() if dashboard else contextlib.nullcontext():
                yield
        finally:
            ctx.render_pool.close()
            ctx.engine.shutdown()

    args = ctx.args
    dashboard = None if args.disable_dashboard else Dashboard(ctx, _version())
    endpoints: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
        ("/v1/models", models, ["GET"]),
        ("/v1/models/{model:path}", model, ["GET"]),
        ("/v1/completions", generation(create_completion, load_report=True), ["POST"]),
        ("/v1/chat/completions", generation(create_chat_completion, load_report=True), ["POST"]),
        ("/v1/chat/completions/batch", generation(create_batch_chat_completion), ["POST"]),
        ("/invocations", generation(create_invocation, load_report=True), ["POST"]),
        ("/tokenize", tokenize, ["POST"]),
        ("/detokenize", detokenize, ["POST"]),
        ("/health", health, ["GET"]),
        ("/ping", health, ["GET", "POST"]),  # SageMaker's health check
        ("/version", version, ["GET"]),
        ("/metrics", metrics, ["GET"]),
        ("/load", load, ["GET"]),
    ]
    if args.enable_tokenizer_info_endpoint:
        endpoints.append(("/tokenizer_info", show_tokenizer_info, ["GET"]))
    if dashboard is not None:
        endpoints += dashboard.endpoints()
    routes = [Route(path, guarded(endpoint), methods=methods) for path, endpoint, methods in endpoints]
    middleware = []
    if args.root_path:
        middleware.append(Middleware(RootPath, root_path=args.root_path))
    if args.enable_request_id_headers:
        middleware.append(Middleware(RequestIdHeaders))
    middleware += [
        Middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                   allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials),
        Middleware(EndAtShutdownDeadline, deadline=ctx.shutdown),
    ]
    if args.api_key:
        middleware.append(Middleware(BearerAuth, api_keys=args.api_key))
    # NOTE: after auth: a client without the key gets its 401 before the server buffers its body.
    middleware.append(Middleware(BufferedBody, max_bytes=args.max_request_body_bytes,
                                 timeout_s=args.request_body_timeout))
    if args.enable_server_load_tracking:
        middleware.append(Middleware(ctx.load.middleware))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: unhandled_error})
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
