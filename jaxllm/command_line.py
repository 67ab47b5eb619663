"""The `jaxllm serve` command line: flags generated from `jaxllm.config.EngineConfig` and
`serve.args.ServerArgs` (one per field, `--help` from the field docs), plus every other flag of vLLM 0.34.0
from the table `jaxllm.vllm_flags`: refused (exit 2, naming it) where ignoring it would change results or
security, else accepted with one warning line. vLLM's spellings (--config FILE.yaml, --x-config.key VALUE,
...) are rewritten by `jaxllm.vllm_argv` first, so vLLM command lines keep working.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxllm import __version__, vllm_argv
from jaxllm.config import NESTED, EngineConfig, field_owners, nested_config, option_fields
from jaxllm.vllm_flags import Arity, Group, VllmFlag, by_group
from serve.args import API_KEY_ENVS, ServerArgs
from serve.reasoning_parsers import REASONING_PARSERS

logger = logging.getLogger("jaxllm.serve")

# vLLM's other spellings of some options (--nnodes / --node-rank: one jaxllm process per host).
_ALIASES = {
    "tensor_parallel_size": ["-tp"], "enable_expert_parallel": ["-ep"], "num_processes": ["--nnodes", "-n"],
    "process_id": ["--node-rank", "-r"],
    "gpu_memory_utilization": ["--device-memory-utilization"], "quantization": ["-q"],
}
# Flags whose integer value may be written 8k / 1M, as vLLM accepts.
_SIZE_FLAGS = {"max_model_len", "max_num_batched_tokens"}
# vLLM's multi-node rendezvous, which jaxllm names --distributed-coordinator host:port.
_MASTER_PORT = 29501


def build_parser(prog: str = "python -m jaxllm.serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [MODEL] [flags]",
        description="jaxllm's OpenAI-compatible server (vLLM's flags, endpoints and JSON).",
        epilog=f"Every other flag of vLLM 0.34.0's `vllm serve` parses too: {len(by_group(Group.WARNED))} are "
               f"accepted with a one-line warning, {len(by_group(Group.REFUSED))} stop the server with a message "
               "naming them (they would silently change results or security). docs/vllm-flags.md lists each "
               "with the reason.",
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
    for row in (*by_group(Group.REFUSED), *by_group(Group.WARNED)):
        _add_vllm_flag(parser, row)
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


def _add_vllm_flag(parser: argparse.ArgumentParser, row: VllmFlag) -> None:
    """A refused or warned flag: parsed as vLLM parses it, kept out of --help (the epilog points to the table)."""
    kwargs: dict[str, Any] = {"dest": row.dest, "default": None, "help": argparse.SUPPRESS}
    if row.arity is Arity.SWITCH:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["metavar"] = "VALUE"
        kwargs["nargs"] = {Arity.ONE: None, Arity.MANY: "+", Arity.OPTIONAL: "?"}[row.arity]
        if row.arity is Arity.OPTIONAL:
            kwargs["const"] = "true"
    parser.add_argument(*row.names, **kwargs)


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
        kwargs["type"] = _attention_backend(f.metadata["choices"]) if f.name == "attention_backend" else str
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


def _attention_backend(known: tuple[str, ...]) -> Callable[[str], str]:
    """--attention-backend: jaxllm's backends by name; vLLM's (FLASH_ATTN, FLASHINFER, ...: CUDA kernels)
    mean auto, with a warning."""

    def parse(name: str) -> str:
        if name in known:
            return name
        logger.warning("--attention-backend %s is one of vLLM's CUDA kernels; jaxllm picks its own (auto).", name)
        return "auto"

    return parse


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
