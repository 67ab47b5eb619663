"""`SamplingParams` with vLLM's names, defaults and range checks (`jaxllm.validation.validate_sampling`)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from jaxllm.validation import validate_sampling

__all__ = ["RequestOutputKind", "SamplingParams", "StructuredOutputsParams"]

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.IntEnum):
    """How a request's outputs are reported (vLLM's): everything so far at each step, only what is new
    since the last output (streaming), or once, when the request has finished (the offline API)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


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
    logprobs: int | None = None  # top-k logprobs per output token (plus the sampled one); -1: the whole vocabulary
    prompt_logprobs: int | None = None  # as logprobs, per prompt token
    # The logprobs of these token ids at each output position (plus the sampled one), instead of the top-k.
    logprob_token_ids: list[int] | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine from the model: ids that end a request unless ignore_eos.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # Filled by validation from the tokenizer (`jaxllm.validation.tokenize_bad_words`): the token ids of each bad
    # word, without and with a leading space.
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

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
        if self.logprob_token_ids is not None:
            self.logprob_token_ids = list(self.logprob_token_ids)
        validate_sampling(self)

    @property
    def num_logprobs(self) -> int | None:
        """Logprobs per output position (vLLM's): `logprobs`, else the count of `logprob_token_ids`; None: none."""
        if self.logprobs is not None:
            return self.logprobs
        return len(self.logprob_token_ids) if self.logprob_token_ids else None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)
