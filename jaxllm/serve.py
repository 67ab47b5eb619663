"""`python -m jaxllm.serve`: vLLM's command line, the engine, and uvicorn.

    python -m jaxllm.serve --model meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192 --api-key sk-local

Flags: `jaxllm.command_line` (vLLM's, with jaxllm's own). The engine is built by
`jaxllm.serving.build_async_engine`, in a child process (`jaxllm.engine.engine_process`) unless
--disable-frontend-multiprocessing. The HTTP stack (`serve.app`) loads while that process imports
and builds the engine.

Shutdown: SIGTERM/SIGINT stop accepting connections, in-flight requests get `--shutdown-timeout`
seconds to finish, the rest are ended (`serve.middleware.ShutdownDeadline`: a stream with an error event and
[DONE], a request not yet answered with a 503; each aborted in the engine), and the process exits 0.
If the engine dies, in-flight requests get a 500, /health turns 503 and the process exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING

import uvicorn

from jaxllm.command_line import parse_args
from jaxllm.engine.client import EngineClient
from jaxllm.engine.engine_process import LOG_FORMAT
from jaxllm.serving import build_async_engine, follow_process_zero
from serve.args import ServerArgs

if TYPE_CHECKING:
    from serve.app import ServingContext

logger = logging.getLogger("jaxllm.serve")

# Seconds the requests ended at the shutdown deadline get to write their ending before uvicorn cancels them.
ENDING_GRACE_S = 5.0

def make_context(engine: EngineClient, args: ServerArgs) -> ServingContext:
    """The app's state (`serve.app`, loaded on demand: heavy)."""
    from serve.app import ServingContext  # noqa: PLC0415

    if engine.info.default_sampling:
        logger.info("Using default sampling params from the model's generation config: %s",
                    engine.info.default_sampling)
    return ServingContext(engine=engine, args=args)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServingContext) -> None:
        super().__init__(config)
        self.ctx = ctx

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = asyncio.get_running_loop().call_later(max(self.ctx.args.shutdown_timeout, 0.0),
                                                         self._end_running_requests)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _end_running_requests(self) -> None:
        if running := self.ctx.shutdown.expire():
            logger.warning("--shutdown-timeout (%g s) expired; ending %d unfinished request(s).",
                           self.ctx.args.shutdown_timeout, running)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # NOTE: uvicorn re-raises a captured SIGTERM after shutting down, which kills the process with
        # status 143; a graceful shutdown here ends with status 0, so the signal is handled, not re-raised.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


async def _watch_engine(ctx: ServingContext, server: uvicorn.Server) -> None:
    while not ctx.engine.is_dead:
        await asyncio.sleep(0.2)
    logger.error("The engine died (%r); shutting down.", ctx.engine.dead_error)
    server.should_exit = True


def run_server(ctx: ServingContext, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT (exit status 0) or the engine's death (1). `sock`: an already bound socket."""
    from serve.app import build_app  # noqa: PLC0415  (heavy: see main)
    from serve.http_protocol import http_protocol  # noqa: PLC0415

    args = ctx.args
    tls = {"ssl_keyfile": args.ssl_keyfile, "ssl_certfile": args.ssl_certfile, "ssl_ca_certs": args.ssl_ca_certs,
           "ssl_ciphers": args.ssl_ciphers}
    config = uvicorn.Config(
        build_app(ctx),
        host=args.host or "0.0.0.0",
        port=args.port,
        uds=args.uds,
        ssl_cert_reqs=args.ssl_cert_reqs,
        **{name: value for name, value in tls.items() if value is not None},
        log_level=args.uvicorn_log_level,
        http=http_protocol(args),
        timeout_graceful_shutdown=max(args.shutdown_timeout, 0.0) + ENDING_GRACE_S,
        access_log=False,
        log_config=None,
    )
    server = _Server(config, ctx)
    ctx.render_pool.start_in_background()

    async def serve() -> None:
        # NOTE: the periodic stats line is the engine's (build_async_engine(..., log_stats=...)).
        watchdog = asyncio.create_task(_watch_engine(ctx, server))
        try:
            await server.serve(sockets=[sock] if sock is not None else None)
        finally:
            watchdog.cancel()

    # NOTE: uvicorn's own choice of loop (uvloop when installed), as `uvicorn.run` would make: the
    # event loop writes every SSE chunk of every stream, and uvloop (with httptools, which uvicorn
    # picks by itself) cuts its per-chunk cost.
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve())
    return 1 if ctx.engine.is_dead or not server.started else 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m jaxllm.serve") -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    engine_config, server_args = parse_args(argv, prog)
    if engine_config.parallel.process_id > 0:  # multi-process: process 0 serves HTTP, the others follow it
        follow_process_zero(engine_config)
        return 0

    # NOTE: the HTTP stack is imported while the engine process builds the engine, on this thread: two
    # threads importing transformers at once can meet its lazy module half-initialized.
    engine = build_async_engine(engine_config, log_stats=not server_args.disable_log_stats,
                                in_process=server_args.disable_frontend_multiprocessing,
                                while_building=lambda: importlib.import_module("serve.app"))
    return run_server(make_context(engine, server_args))


if __name__ == "__main__":
    sys.exit(main())
