"""What the server needs of the engine (`jaxllm.engine.async_engine.AsyncEngine` fits it), and the
per-app state every handler reads."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from jaxllm.config import EngineConfig
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams
from serve.args import ServerArgs

request_logger = logging.getLogger("jaxllm.serve.requests")


class EngineClient(Protocol):
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    config: EngineConfig
    max_model_len: int
    vocab_size: int
    is_dead: bool
    dead_error: BaseException | None

    def generate(
        self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str, *,
        prompt: str | None = None, cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Delta outputs; ValueError from the first __anext__ on a bad request; closing it aborts."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def metrics(self) -> EngineMetrics: ...


@dataclass
class ServingContext:
    engine: EngineClient
    args: ServerArgs
    served_model_names: list[str]  # the first is reported in responses
    model_root: str  # the model directory or id, /v1/models' `root`
    default_sampling: dict[str, Any] = field(default_factory=dict)  # from generation_config.json
    chat_template: str | None = None  # --chat-template, resolved to text
    started_at: float = field(default_factory=time.time)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def log_request(self, request_id: str, prompt_tokens: int, output_tokens: int, start: float, status: str) -> None:
        """One line per request when --enable-log-requests; never headers, so never the API key."""
        if self.args.enable_log_requests:
            request_logger.info(
                "request %s: prompt_tokens=%d output_tokens=%d latency=%.3fs status=%s",
                request_id, prompt_tokens, output_tokens, time.perf_counter() - start, status,
            )
