"""vLLM's command-line spellings rewritten into plain argparse arguments, before parsing (as vLLM's
FlexibleArgumentParser does):

- `--config FILE.yaml`: the file's flags, placed before the command line's (which win);
- `--max_model_len`: underscores in a flag's name read as dashes;
- `-O3` / `-O 3`: --optimization-level 3;
- `--x-config.key VALUE`, `--x-config.key=VALUE`, `--x-config.a.b VALUE`, `--x-config.key+ a,b`: one
  `--x-config '{"key": VALUE}'` per flag, each VALUE read as JSON when it parses (true, 3, [1]), else
  kept as a string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The part of a flag's name before any '.' or '=' (the config keys after a '.' keep their underscores).
_FLAG_NAME = re.compile(r"^--[^.=]*")
# A dotted flag: --x-config.key, or vLLM's short spellings (-cc.key); never a negative number (-1.5).
_DOTTED = re.compile(r"^--?[A-Za-z][^.=]*\.")


def normalize(argv: Sequence[str]) -> list[str]:
    """Raises ValueError for an unreadable --config file or a dotted flag without its value."""
    args = _with_config_file(list(argv))
    args = [_FLAG_NAME.sub(lambda m: m.group(0).replace("_", "-"), a) if a.startswith("--") else a for a in args]
    return _dotted_to_json(_optimization_level(args))


def _with_config_file(args: list[str]) -> list[str]:
    for i, arg in enumerate(args):
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config" and i + 1 == len(args):
                raise ValueError("--config needs a YAML file")
            path = arg.removeprefix("--config=") if arg != "--config" else args[i + 1]
            rest = args[:i] + args[i + (1 if arg != "--config" else 2):]
            return config_file_args(Path(path)) + rest
    return args


def config_file_args(path: Path) -> list[str]:
    """A vLLM YAML config as flags: `key: value` -> --key value; true -> --key, false -> --no-key;
    a list -> --key v1 v2; a mapping -> --key '<its JSON>'."""
    import yaml  # noqa: PLC0415  (only for --config)

    if path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"--config must be a .yaml or .yml file, got {str(path)!r}")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    args: list[str] = []
    for key, value in config.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            args += [f"--{key}", *map(str, value)] if value else []
        elif isinstance(value, dict):
            args += [f"--{key}", json.dumps(value)]
        else:
            args += [f"--{key}", str(value)]
    return args


def _optimization_level(args: list[str]) -> list[str]:
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("-O") and arg != "-O":
            out += ["--optimization-level", arg[3:] if arg[2] == "=" else arg[2:]]
        elif arg == "-O" and i + 1 < len(args) and args[i + 1] in {"0", "1", "2", "3"}:
            out.append("--optimization-level")
        else:
            out.append(arg)
    return out


def _dotted_to_json(args: list[str]) -> list[str]:
    out: list[str] = []
    objects: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if not _DOTTED.match(name):
            out.append(arg)
            i += 1
            continue
        if "=" in arg:
            text = arg.split("=", 1)[1]
            i += 1
        elif i + 1 < len(args):
            text = args[i + 1]
            i += 2
        else:
            raise ValueError(f"{arg} needs a value")
        flag, *keys = name.split(".")
        value: Any = _json_or_text(text)
        if keys[-1].endswith("+"):  # vLLM's `--x.key+ a,b`: a list
            keys[-1] = keys[-1][:-1]
            value = text.split(",")
        _set_nested(objects.setdefault(flag, {}), keys, value)
    for flag, obj in objects.items():
        out += [flag, json.dumps(obj)]
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_nested(obj: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        obj = obj.setdefault(key, {})
    obj[keys[-1]] = value
