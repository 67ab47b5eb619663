"""Beam search above the engine, as vLLM 0.34.0 runs it: the bookkeeping, ranking and length penalty.

    BeamSearch(prompt, params, eos, max_model_len)
      .live                       the beams still growing: submit each as a prompt with `params.step_params()`
      .advance([top logprobs])    one dict per live beam (the engine's top 2 * beam_width next tokens, or the
                                  allowed tokens')
      .done / .best()             the beam_width best of the finished and live beams, by length-penalized score

Each step, every (live beam, candidate token) pair is a candidate beam; one ending in EOS (unless ignore_eos)
is finished, the beam_width others with the highest cumulative logprob grow on. The final ranking divides
the cumulative logprob by the number of generated tokens (EOS included) to the power `length_penalty`.

The drivers (`jaxllm.llm.LLM.beam_search`, `serve.beam_search`) submit each beam as a new request; the
engine's prefix cache gives it the KV pages of the prefix it shares with the prompt and its parent beam, so
only the tokens past the last full shared page are computed again.

No jax and no engine here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jaxllm.outputs import Logprob
from jaxllm.sampling_params import SamplingParams
from jaxllm.validation import ValidationError


@dataclass
class BeamSearchParams:
    """vLLM's `BeamSearchParams`: the fields beam search reads."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None  # the only tokens a beam may grow by

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValidationError(f"beam_width must be at least 1, got {self.beam_width!r}.", "beam_width")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValidationError(f"max_tokens must be at least 1, got {self.max_tokens!r}.", "max_tokens")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValidationError("Beam search allowed_token_ids must not be empty", "allowed_token_ids")

    def step_params(self, max_tokens: int | None = 1) -> SamplingParams:
        """The engine request of a beam's step: one token, with the 2 * beam_width most likely (as Transformers
        draws 2 * beam_width candidates, so beam_width survive even when some of them end in EOS), or with
        each allowed token's, from the unmasked distribution (vLLM's). A server validating the whole request
        first passes its `max_tokens`."""
        if self.allowed_token_ids is not None:
            return SamplingParams(max_tokens=max_tokens, logprob_token_ids=list(self.allowed_token_ids),
                                  temperature=self.temperature, detokenize=False)
        return SamplingParams(max_tokens=max_tokens, logprobs=2 * self.beam_width, temperature=self.temperature,
                              detokenize=False)


@dataclass
class BeamSearchSequence:
    """vLLM's: `tokens` are the prompt's and the generated ones (a final EOS included); `logprobs` holds the
    top-logprob dict of each generated position; `text` is set by the driver on the final beams."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS), "length", "abort"
    stop_reason: int | None = None  # the EOS id that ended it


@dataclass
class BeamSearchOutput:
    """The beam_width best sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(num_generated_tokens: int, cum_logprob: float, length_penalty: float) -> float:
    """vLLM's (and Transformers') ranking score; an aborted beam may have generated nothing."""
    return cum_logprob / (max(num_generated_tokens, 1) ** length_penalty)


class BeamSearch:
    """The beams of one prompt."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: frozenset[int] | set[int],
                 max_model_len: int) -> None:
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self._eos = frozenset(eos_token_ids)
        self._allowed = None if params.allowed_token_ids is None else frozenset(params.allowed_token_ids)
        self._max_model_len = max_model_len
        self.live = [BeamSearchSequence(list(prompt_token_ids))]
        self.finished: list[BeamSearchSequence] = []
        self.num_steps = 0

    @property
    def done(self) -> bool:
        return not self.live or self.num_steps >= self.params.max_tokens

    def advance(self, next_token_logprobs: list[dict[int, Logprob]]) -> None:
        """One step: `next_token_logprobs[i]` is the engine's top-logprob dict after `live[i]`."""
        if len(next_token_logprobs) != len(self.live):
            raise ValueError(f"{len(next_token_logprobs)} logprob dicts for {len(self.live)} live beams")
        candidates = []
        for beam, top in zip(self.live, next_token_logprobs, strict=True):
            for token_id, logprob in top.items():
                if self._allowed is not None and (token_id not in self._allowed or not math.isfinite(logprob.logprob)):
                    continue  # the sampled token, drawn from the whole vocabulary, or one the model rules out
                grown = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [top],
                                           beam.cum_logprob + logprob.logprob)
                if token_id in self._eos and not self.params.ignore_eos:
                    grown.finish_reason, grown.stop_reason = "stop", token_id
                    self.finished.append(grown)
                else:
                    candidates.append(grown)
        # NOTE: the candidates all have one length, so the cumulative logprob ranks them as the score would.
        candidates.sort(key=lambda beam: beam.cum_logprob, reverse=True)
        self.live = []
        for beam in candidates[:self.params.beam_width]:
            if len(beam.tokens) >= self._max_model_len:
                beam.finish_reason = "length"
                self.finished.append(beam)
            else:
                self.live.append(beam)
        self.num_steps += 1

    def abort(self) -> None:
        """The search was cut off: its live beams end as they are."""
        for beam in self.live:
            beam.finish_reason = "abort"
        self.finished += self.live
        self.live = []

    def best(self) -> list[BeamSearchSequence]:
        """The beam_width best of the finished and live beams (a live one ends with "length"), best first."""
        for beam in self.live:
            beam.finish_reason = beam.finish_reason or "length"
        ranked = sorted(self.finished + self.live, reverse=True,
                        key=lambda b: beam_score(len(b.logprobs), b.cum_logprob, self.params.length_penalty))
        return ranked[:self.params.beam_width]

    def generated_token_ids(self, beam: BeamSearchSequence) -> list[int]:
        """A beam's output ids as the server reports them: its EOS only with include_stop_str_in_output."""
        generated = beam.tokens[self.num_prompt_tokens:]
        if beam.finish_reason == "stop" and not self.params.include_stop_str_in_output:
            return generated[:-1]
        return generated
