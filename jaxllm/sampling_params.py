"""`SamplingParams` with vLLM's names, defaults and validation (a `ValueError` naming the field)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5
# Logprobs per position at most (vLLM's default max_logprobs): the sampler computes this many.
MAX_LOGPROBS = 20


@dataclass
class StructuredOutputsParams:
    """vLLM's `structured_outputs`: exactly one of json / regex / choice / grammar / json_object."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Set by the chat server for tool calling: the grammar must produce a tool call.
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                 if getattr(self, n) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                f"got {given or 'none'}"
            )


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per output token (plus the sampled one)
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine from the model: ids that end a request unless ignore_eos.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name} {msg}, got {getattr(self, name)!r}.")

        check(isinstance(self.n, int) and self.n >= 1, "n", "must be at least 1")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        check(self.temperature >= 0.0, "temperature", "must be non-negative")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be 0 or -1 (disable), or at least 1")
        check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              "max_tokens", "must be at least 1")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be non-negative")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens", "must be less than or equal to max_tokens")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
              "logprobs", "must be non-negative")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
              "prompt_logprobs", "must be non-negative")
        check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        check(all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids", "must be integers")
        check(self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
              "allowed_token_ids", "must not be empty")
        if self.logit_bias:
            check(all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias",
                  "values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate_vocab(self, vocab_size: int) -> None:
        """Token-id checks that need the model's vocabulary size."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name) or []
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name} contains out-of-vocab token ids {bad[:5]} (vocab size {vocab_size}).")
        bad = [t for t in (self.logit_bias or {}) if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"logit_bias contains out-of-vocab token ids {bad[:5]} (vocab size {vocab_size}).")

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)
