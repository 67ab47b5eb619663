"""`FakeModelRunner`: a `ModelRunnerProtocol` whose next token can be worked out by hand.

It simulates the KV cache: each computed position writes its token id into the slot
(page_ids[p // block_size], p % block_size), and each sampled token is a function of the context
read back from those pages. A wrong page table, a prefix-cache hit on the wrong page or a page
overwritten while still in use therefore changes the outputs, which tests compare with a run
that has a big pool and no prefix cache.

Like the real runner, it keeps each request's tokens by id and appends its own sampled tokens,
so in async scheduling a decode whose input is an output placeholder reads the real token.

    runner = FakeModelRunner(vocab_size=512, block_size=16)         # default rule, see fake_next_token
    runner = FakeModelRunner(next_token_fn=lambda ctx, seed: 42)      # any rule of (context, seed)
    runner = FakeModelRunner(delay_s=0.01, fail_at_step=3)            # slow device; raise at the 3rd step
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from jaxllm.engine.interfaces import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from jaxllm.engine.live_status import CompileState
from jaxllm.sampling_params import SamplingParams

# Sampled logprob of the rank-r candidate in the fake top-k lists.
FAKE_LOGPROB_STEP = -0.25


def fake_next_token(context: list[int], seed: int, vocab_size: int) -> int:
    """The default rule: (7 * last + len(context) + sum(context) + seed) % vocab (seed 0 when greedy)."""
    return (7 * context[-1] + len(context) + sum(context) + seed) % vocab_size


def fake_top_logprobs(token_id: int, k: int, vocab_size: int) -> TokenLogprobs:
    """token_id is the most likely; the next k - 1 ids follow it, each less likely by FAKE_LOGPROB_STEP
    (k = -1: the whole vocabulary)."""
    k = vocab_size if k == -1 else k
    ids = [(token_id + r) % vocab_size for r in range(k)]
    return TokenLogprobs(ids, [FAKE_LOGPROB_STEP * (r + 1) for r in range(k)], FAKE_LOGPROB_STEP, 1)


def fake_logprobs(token_id: int, params: SamplingParams, vocab_size: int) -> TokenLogprobs | None:
    """What the runner gives a sampled token: None unless asked; the logprobs of `logprob_token_ids` (the
    fake rule's, as fake_top_logprobs ranks them), else the top `logprobs`."""
    if not params.logprob_token_ids:
        return None if params.logprobs is None else fake_top_logprobs(token_id, params.logprobs, vocab_size)
    ids = params.logprob_token_ids
    ranks = [(t - token_id) % vocab_size + 1 for t in ids]
    return TokenLogprobs(list(ids), [FAKE_LOGPROB_STEP * r for r in ranks], FAKE_LOGPROB_STEP, 1)


@dataclass
class _RequestState:
    token_ids: list[int]  # prompt + outputs, including tokens sampled here and not yet seen by the host
    num_prompt_tokens: int
    params: SamplingParams
    page_ids: list[int]
    num_computed_tokens: int


@dataclass
class FakeStepHandle:
    output: ModelRunnerOutput | None  # None until sample() when the step has constrained requests
    delay_s: float = 0.0
    sample_fn: Callable[[dict[str, np.ndarray]], ModelRunnerOutput] | None = None

    def sample(self, grammar_bitmask: dict[str, np.ndarray]) -> None:
        assert self.output is None and self.sample_fn is not None, "sample() without constrained requests"
        self.output = self.sample_fn(grammar_bitmask)

    def result(self) -> ModelRunnerOutput:
        assert self.output is not None, "result() before sample() on a step with constrained requests"
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.output


class InjectedFailure(RuntimeError):
    pass


@dataclass
class FakeModelRunner:
    vocab_size: int = 512
    block_size: int = 16
    # (context read from the KV pages, seed or 0 when greedy) -> next token id.
    next_token_fn: Callable[[list[int], int], int] | None = None
    delay_s: float = 0.0  # slept in each StepHandle.result(), as device time
    fail_at_step: int | None = None  # execute() raises InjectedFailure on this step (1-based)
    # State, for tests to inspect.
    num_steps: int = field(default=0, init=False)
    history: list[SchedulerOutput] = field(default_factory=list, init=False)  # every SchedulerOutput executed
    requests: dict[str, _RequestState] = field(default_factory=dict, init=False)
    kv: dict[tuple[int, int], int] = field(default_factory=dict, init=False)  # (page, slot) -> token id there

    def start_background_work(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def compile_state(self) -> CompileState:
        return CompileState()  # it compiles nothing

    def execute(self, scheduler_output: SchedulerOutput) -> FakeStepHandle:
        self.num_steps += 1
        if self.num_steps == self.fail_at_step:
            raise InjectedFailure(f"injected failure at step {self.num_steps}")
        self.history.append(scheduler_output)
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in scheduler_output.new_requests:
            assert new.req_id not in self.requests, f"{new.req_id} sent twice"
            self.requests[new.req_id] = _RequestState(
                new.prompt_token_ids + new.output_token_ids, len(new.prompt_token_ids), new.sampling_params,
                list(new.page_ids), new.num_computed_tokens)
        for cached in scheduler_output.cached_requests:
            state = self.requests[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens, cached
            state.page_ids.extend(cached.new_page_ids)

        prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        sampling: list[str] = []
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            state = self.requests[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_tokens
            assert end <= len(state.token_ids), f"{req_id}: scheduled past its known tokens"
            assert -(-end // self.block_size) <= len(state.page_ids), f"{req_id}: too few pages"
            for pos in range(start, end):
                self.kv[self._slot(state, pos)] = state.token_ids[pos]
            state.num_computed_tokens = end
            if state.params.prompt_logprobs is not None:
                prompt_logprobs[req_id] = [
                    fake_top_logprobs(state.token_ids[p + 1], state.params.prompt_logprobs, self.vocab_size)
                    for p in range(start, min(end, state.num_prompt_tokens - 1))]
            if end == len(state.token_ids):  # reached the end of its tokens: sample
                sampling.append(req_id)
                # A placeholder until sampled: the next step may be scheduled before sample().
                state.token_ids.append(-1)

        def sample(grammar_bitmask: dict[str, np.ndarray]) -> ModelRunnerOutput:
            output = ModelRunnerOutput([], [], [], prompt_logprobs)
            for req_id in sampling:
                state = self.requests[req_id]
                end = len(state.token_ids) - 1
                context = [self.kv[self._slot(state, pos)] for pos in range(end)]
                token_id = self._sample(context, state.params, grammar_bitmask.get(req_id))
                state.token_ids[end] = token_id
                output.req_ids.append(req_id)
                output.sampled_token_ids.append(token_id)
                output.logprobs.append(fake_logprobs(token_id, state.params, self.vocab_size))
            return output

        if scheduler_output.structured_req_ids:
            return FakeStepHandle(None, self.delay_s, sample)
        return FakeStepHandle(sample({}), self.delay_s)

    def _slot(self, state: _RequestState, pos: int) -> tuple[int, int]:
        return state.page_ids[pos // self.block_size], pos % self.block_size

    def _sample(self, context: list[int], params: SamplingParams, bitmask: np.ndarray | None) -> int:
        seed = 0 if params.greedy else (params.seed or 0)
        if self.next_token_fn is not None:
            token_id = self.next_token_fn(context, seed)
        else:
            token_id = fake_next_token(context, seed, self.vocab_size)
        if bitmask is not None:  # the first allowed id at or after the rule's choice
            allowed = np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:self.vocab_size])
            assert allowed.size, "grammar allows no token"
            later = allowed[allowed >= token_id]
            token_id = int(later[0] if later.size else allowed[0])
        return token_id
