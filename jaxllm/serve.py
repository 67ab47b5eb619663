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

from jaxllm import __version__, vllm_argv
from jaxllm.config import NESTED, EngineConfig, field_owners, nested_config, option_fields
from jaxllm.engine.client import EngineClient
from jaxllm.engine.engine_process import LOG_FORMAT
from jaxllm.serving import build_async_engine, follow_process_zero
from jaxllm.vllm_flags import Arity, Group, VllmFlag, by_group
from serve.args import API_KEY_ENVS, ServerArgs
from serve.reasoning_parsers import REASONING_PARSERS

if TYPE_CHECKING:
    from serve.app import ServingContext

logger = logging.getLogger("jaxllm.serve")

# vLLM's other spellings of some options (--nnodes / --node-rank: one jaxllm process per host).
_ALIASES = {
    "tensor_parallel_size": ["-tp"], "num_processes": ["--nnodes", "-n"], "process_id": ["--node-rank", "-r"],
    "gpu_memory_utilization": ["--device-memory-utilization"],
}
# Flags whose integer value may be written 8k / 1M, as vLLM accepts.
_SIZE_FLAGS = {"max_model_len", "max_num_batched_tokens"}
# vLLM's multi-node rendezvous, which jaxllm names --distributed-coordinator host:port.
_MASTER_PORT = 29501


def build_parser(prog: str = "python -m jaxllm.serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [MODEL] [flags]",
        description="jaxllm's OpenAI-compatible server (vLLM's flags, endpoints and JSON).",
    )
    parser.add_argument("model_tag", nargs="?", default=None, help="Model directory or id (same as --model).")
    parser.add_argument("-v", "--version", action="version", version=__version__)
    parser.add_argument("--config", metavar="FILE.yaml", help="Read flags from a YAML file (vLLM's --config); "
                        "the command line's own flags win.")
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for group, f in option_fields():
        if group not in groups:
            groups[group] = parser.add_argument_group(f"engine options ({group or 'engine'})")
        _add_field(groups[group], f, _ALIASES.get(f.name, []))
    for name, klass in NESTED.items():
        keys = ", ".join(f.name for f in dataclasses.fields(klass))
        groups[None].add_argument(
            "--" + name.replace("_", "-"), dest=name, action=_MergeJSONObject, default={}, metavar="JSON",
            help=f"{' '.join((klass.__doc__ or '').split())} Keys: {keys}.",
        )
    parallel = groups["parallel"]
    parallel.add_argument("--master-addr", default=None, help="vLLM's spelling of --distributed-coordinator's host.")
    parallel.add_argument("--master-port", type=int, default=None,
                          help=f"vLLM's spelling of --distributed-coordinator's port ({_MASTER_PORT} if only "
                               "--master-addr is given).")
    server = parser.add_argument_group("server options")
    for f in dataclasses.fields(ServerArgs):
        _add_field(server, f, [])
    refused = parser.add_argument_group("vLLM flags refused (jaxllm does not start: see docs/vllm-flags.md)")
    warned = parser.add_argument_group("vLLM flags accepted with a warning (no effect in jaxllm)")
    for row in (*by_group(Group.REFUSED), *by_group(Group.WARNED)):
        _add_vllm_flag(refused if row.group is Group.REFUSED else warned, row)
    return parser


class _MergeJSONObject(argparse.Action):
    """A JSON object merged into the ones given before (--x-config '{...}' then --x-config.key value)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            value = json.loads(values)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentError(self, f"not JSON: {e}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentError(self, f"expected a JSON object, got {values!r}")
        setattr(namespace, self.dest, {**getattr(namespace, self.dest), **value})


def _add_vllm_flag(group: argparse._ArgumentGroup, row: VllmFlag) -> None:
    kwargs: dict[str, Any] = {"dest": row.dest, "default": None, "help": row.why.replace("%", "%%")}
    if row.arity is Arity.SWITCH:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["metavar"] = "VALUE"
        kwargs["nargs"] = {Arity.ONE: None, Arity.MANY: "+", Arity.OPTIONAL: "?"}[row.arity]
        if row.arity is Arity.OPTIONAL:
            kwargs["const"] = "true"
    group.add_argument(*row.names, **kwargs)


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, aliases: list[str]) -> None:
    doc = f.metadata["doc"].replace("%", "%%")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    flags = ["--" + f.name.replace("_", "-"), *aliases]
    # NOTE: a default that is empty, or that the doc already tells, is not repeated.
    shown = default not in (None, [], "") and "default" not in doc
    help_text = f"{doc} (default: {default})" if shown else doc
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
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
    """Exits 2 with a message for a bad or refused flag; logs one warning per vLLM flag without effect."""
    parser = build_parser(prog)
    try:
        ns = vars(parser.parse_args(vllm_argv.normalize(sys.argv[1:] if argv is None else argv)))
    except ValueError as e:  # --config's file, a dotted flag's value
        parser.error(str(e))
    if ns["enable_auto_tool_choice"] and not ns["tool_call_parser"]:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")  # vLLM refuses to start too
    if ns["enable_per_request_metrics"] and ns["disable_log_stats"]:  # as vLLM's validate_parsed_serve_args
        parser.error("--enable-per-request-metrics requires engine statistics logging; remove --disable-log-stats "
                     "to enable per-request metrics.")
    _check_vllm_flags(parser, ns)
    model_tag = ns.pop("model_tag")
    if model_tag is not None:
        ns["model"] = model_tag
    _apply_master_address(ns)
    _route_structured_outputs_reasoning_parser(parser, ns)
    for name, klass in NESTED.items():
        try:
            ns[name] = nested_config(klass, ns[name])
        except ValueError as e:
            parser.error(f"--{name.replace('_', '-')}: {e}")
    engine_names = set(field_owners())
    try:
        engine_config = EngineConfig.from_kwargs(**{k: v for k, v in ns.items() if k in engine_names})
    except ValueError as e:  # e.g. --num-processes 2 without --distributed-coordinator
        parser.error(str(e))
    server_values = {f.name: ns[f.name] for f in dataclasses.fields(ServerArgs)}
    for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
        server_values[name] = _json_or_list(server_values[name])
    if not server_values["api_key"]:
        server_values["api_key"] = [key for key in map(os.environ.get, API_KEY_ENVS) if key]
    return engine_config, ServerArgs(**server_values)


def _check_vllm_flags(parser: argparse.ArgumentParser, ns: dict[str, Any]) -> None:
    """Refused flags stop here (exit 2); warned ones log one line each."""
    for row in (*by_group(Group.REFUSED), *by_group(Group.WARNED)):
        value = ns.pop(row.dest)
        if value is None:
            continue
        if row.group is Group.WARNED:
            logger.warning("%s has no effect in jaxllm (%s); ignored.", row.flag, row.why)
        elif value is not False and str(value) not in row.harmless:
            shown = "" if value is True else " " + " ".join(map(str, value if isinstance(value, list) else [value]))
            parser.error(f"jaxllm does not start with {row.flag}{shown}: {row.why}.")


def _apply_master_address(ns: dict[str, Any]) -> None:
    """vLLM's --master-addr / --master-port as --distributed-coordinator host:port."""
    addr, port = ns.pop("master_addr"), ns.pop("master_port")
    if (addr or port) and ns["distributed_coordinator"] is None:
        ns["distributed_coordinator"] = f"{addr or '127.0.0.1'}:{port or _MASTER_PORT}"


def _route_structured_outputs_reasoning_parser(parser: argparse.ArgumentParser, ns: dict[str, Any]) -> None:
    """vLLM's --reasoning-parser is its structured_outputs_config.reasoning_parser: either spelling works."""
    name = ns["structured_outputs_config"].pop("reasoning_parser", None)
    if name and ns["reasoning_parser"] is None:
        if name not in REASONING_PARSERS:
            parser.error(f"--structured-outputs-config.reasoning_parser: unknown parser {name!r} "
                         f"(choose from {', '.join(REASONING_PARSERS)})")
        ns["reasoning_parser"] = name


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
