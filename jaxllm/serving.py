"""The server's engine: its loop in a child process, or on a thread of the HTTP process.

NOTE: light to import (nothing of transformers, torch or jax): `python -m jaxllm.serve` starts the
engine process first and loads its own HTTP stack while the child imports and builds the engine.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from jaxllm.config import EngineConfig
from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.client import EngineClient
from jaxllm.engine.core import follow
from jaxllm.engine.engine_process import ProcessEngine

if TYPE_CHECKING:
    from jaxllm.build import EngineParts

logger = logging.getLogger(__name__)


def build_served_engine(config: EngineConfig, log_stats: bool = False) -> EngineParts:
    """`jaxllm.build.build_engine` for serving; the engine process's factory (importable without it)."""
    from jaxllm.build import build_engine  # noqa: PLC0415  (device code)

    return build_engine(config, served=True, log_stats=log_stats)


def build_async_engine(config: EngineConfig, *, log_stats: bool = True, in_process: bool = False,
                       while_building: Callable[[], object] = lambda: None) -> EngineClient:
    """The server's engine: its loop in a child process (`ProcessEngine`), or on a thread of this
    one with `in_process` and on every multi-process run, whose process 0 publishes its loop's iterations.
    `while_building` runs here while the engine process builds (first, when the engine builds here)."""
    if not in_process and config.parallel.num_processes == 1:
        return ProcessEngine(functools.partial(build_served_engine, config, log_stats), while_building)
    while_building()
    parts = build_served_engine(config, log_stats)
    publish = None
    if config.parallel.num_processes > 1:
        from jaxllm import distributed  # noqa: PLC0415

        publish = distributed.StepPublisher(config.parallel.num_processes)
    return AsyncEngine(parts.engine, publish, default_sampling=parts.generation_defaults.sampling,
                       chat_template=parts.chat_template, model_type=parts.model_type)


def follow_process_zero(config: EngineConfig) -> int:
    """Processes 1..N-1 of a multi-process server: no HTTP; build the same engine and replay process 0's
    engine loop until it stops (`jaxllm.engine.core.follow`). Returns the number of steps run."""
    from jaxllm import distributed  # noqa: PLC0415

    parts = build_served_engine(config)
    logger.info("Process %d: following process 0's engine loop (process 0 serves HTTP)", config.parallel.process_id)
    steps = follow(parts.engine, distributed.StepReceiver(config.parallel.process_id))
    logger.info("Process 0 stopped; %d steps run here", steps)
    return steps
