"""`python -m jaxllm.serve`: vLLM's command line, the engine, and uvicorn.

    python -m jaxllm.serve --model meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192 --api-key sk-local

Engine flags are generated from `jaxllm.config.EngineConfig` (one per field, `--help` from the field
docs), server flags from `serve.args.ServerArgs`; common vLLM flags that mean nothing here are accepted
with a warning, so vLLM command lines keep working. The engine is built by
`jaxllm.serving.build_async_engine`, in a child process (`jaxllm.engine.engine_process`) unless
--disable-frontend-multiprocessing. The HTTP stack (`serve.app`) loads while that process imports
and builds the engine.

Shutdown: SIGTERM/SIGINT stop accepting connections, in-flight requests get `--shutdown-timeout`
seconds to finish, the rest are cancelled (which aborts them in the engine), and the process exits 0.
If the engine dies, in-flight requests get a 500, /health turns 503 and the process exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn

from jaxllm.config import EngineConfig, field_owners, option_fields
from jaxllm.engine.client import EngineClient
from jaxllm.engine.engine_process import LOG_FORMAT
from jaxllm.serving import build_async_engine, follow_process_zero
from serve.args import API_KEY_ENV, ServerArgs

if TYPE_CHECKING:
    from serve.app import ServingContext

logger = logging.getLogger("jaxllm.serve")

# vLLM's spellings of some flags (--nnodes / --node-rank: one jaxllm process per host).
_ALIASES = {"tensor_parallel_size": ["-tp"], "num_processes": ["--nnodes"], "process_id": ["--node-rank"]}
# Flags whose integer value may be written 8k / 1M, as vLLM accepts.
_SIZE_FLAGS = {"max_model_len", "max_num_batched_tokens"}
# vLLM flags accepted with a warning: (flag, takes a value). Booleans also accept their --no- form.
IGNORED_VLLM_FLAGS: list[tuple[str, bool]] = [
    ("--trust-remote-code", False),
    ("--enforce-eager", False),
    ("--enable-chunked-prefill", False),
    ("--disable-custom-all-reduce", False),
    ("--disable-log-requests", False),
    ("--disable-uvicorn-access-log", False),
    ("--use-v2-block-manager", False),
    ("--swap-space", True),
    ("--distributed-executor-backend", True),
    ("--max-seq-len-to-capture", True),
    ("--num-scheduler-steps", True),
    ("--tokenizer-mode", True),
    ("--max-log-len", True),
    ("--compilation-config", True),
    ("--api-server-count", True),
    ("--pipeline-parallel-size", True),
]


def build_parser(prog: str = "python -m jaxllm.serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [MODEL] [flags]",
        description="jaxllm's OpenAI-compatible server (vLLM's flags, endpoints and JSON).",
    )
    parser.add_argument("model_tag", nargs="?", default=None, help="Model directory or id (same as --model).")
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for group, f in option_fields():
        if group not in groups:
            groups[group] = parser.add_argument_group(f"engine options ({group or 'engine'})")
        _add_field(groups[group], f, _ALIASES.get(f.name, []))
    server = parser.add_argument_group("server options")
    for f in dataclasses.fields(ServerArgs):
        _add_field(server, f, [])
    ignored = parser.add_argument_group("vLLM flags accepted for compatibility (no effect in jaxllm)")
    for flag, takes_value in IGNORED_VLLM_FLAGS:
        dest = "ignored_" + flag[2:].replace("-", "_")
        if takes_value:
            ignored.add_argument(flag, dest=dest, default=None, metavar="VALUE", help="ignored")
        else:
            ignored.add_argument(flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help="ignored")
    return parser


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, aliases: list[str]) -> None:
    doc = f.metadata["doc"].replace("%", "%%")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    flags = ["--" + f.name.replace("_", "-"), *aliases]
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f"{doc} (default: {default})"}
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    kind = str(f.type).replace(" ", "")
    if kind in ("bool", "bool|None"):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind in ("int", "int|None"):
        kwargs["type"] = _size_int if f.name in _SIZE_FLAGS else int
    elif kind == "float":
        kwargs["type"] = float
    elif kind in ("str", "str|None"):
        kwargs["type"] = str
    elif kind in ("list[str]", "list[int]"):
        kwargs["nargs"] = "+"
        kwargs["type"] = str if kind == "list[str]" else int
    else:
        raise TypeError(f"no command-line form for option {f.name!r} of type {f.type!r}")
    group.add_argument(*flags, **kwargs)


def _size_int(text: str) -> int:
    """An integer, optionally with a k/m suffix (1k = 1000, 1K = 1024, as vLLM's human-readable ints)."""
    units = {"k": 1000, "m": 1000**2, "K": 1024, "M": 1024**2}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _json_or_list(values: list[str]) -> list[str]:
    """vLLM takes e.g. --allowed-origins '["http://a"]' (JSON); also accept plain space-separated values."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        return [str(v) for v in json.loads(values[0])]
    return values


def parse_args(argv: Sequence[str] | None, prog: str = "python -m jaxllm.serve") -> tuple[EngineConfig, ServerArgs]:
    parser = build_parser(prog)
    ns = vars(parser.parse_args(argv))
    if ns["enable_auto_tool_choice"] and not ns["tool_call_parser"]:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")  # vLLM refuses to start too
    for name, value in ns.items():
        if name.startswith("ignored_") and value is not None:
            flag = "--" + name.removeprefix("ignored_").replace("_", "-")
            logger.warning("%s has no effect in jaxllm; ignored.", flag)
    model_tag = ns.pop("model_tag")
    if model_tag is not None:
        ns["model"] = model_tag
    engine_names = set(field_owners())
    try:
        engine_config = EngineConfig.from_kwargs(**{k: v for k, v in ns.items() if k in engine_names})
    except ValueError as e:  # e.g. --num-processes 2 without --distributed-coordinator
        parser.error(str(e))
    server_values = {f.name: ns[f.name] for f in dataclasses.fields(ServerArgs)}
    for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
        server_values[name] = _json_or_list(server_values[name])
    if server_values["api_key"] is None:
        server_values["api_key"] = os.environ.get(API_KEY_ENV) or None
    return engine_config, ServerArgs(**server_values)


def make_context(engine: EngineClient, args: ServerArgs) -> ServingContext:
    """The app's state (`serve.app`, loaded on demand: heavy)."""
    from serve.app import ServingContext  # noqa: PLC0415

    if engine.info.default_sampling:
        logger.info("Using default sampling params from the model's generation config: %s",
                    engine.info.default_sampling)
    return ServingContext(engine=engine, args=args)


class _Server(uvicorn.Server):
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

    args = ctx.args
    config = uvicorn.Config(
        build_app(ctx),
        host=args.host or "0.0.0.0",
        port=args.port,
        log_level=args.uvicorn_log_level,
        root_path=args.root_path or "",
        timeout_graceful_shutdown=max(args.shutdown_timeout, 0.001),
        access_log=False,
        log_config=None,
    )
    server = _Server(config)

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
