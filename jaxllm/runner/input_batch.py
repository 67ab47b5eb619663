"""Host side of a step: the runner's per-request state and the padded numpy arrays of one batch.

The runner keeps each request's tokens, pages and sampling params (sent once by the scheduler,
then diffs). A step's arrays are built here in numpy and shipped to the device in one transfer.

NOTE: with async scheduling, a decode's input token may be the one the previous step sampled,
not yet on the host. Its input id is then a placeholder: `placeholder_rows[t]` names the row of
the previous step's device-resident token array to substitute, on device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from jaxllm.engine.interfaces import CachedRequestData, NewRequestData, SchedulerOutput
from jaxllm.runner.sampler import LogprobWidths, SamplerFlags, SamplingBatch
from jaxllm.sampling_params import SamplingParams
from jaxllm.validation import MAX_LOGPROB_TOKEN_IDS

# The narrowest bad-words table sent (a compiled shape, `SamplingBatch.bad_word_ids`): words per row, tokens per word.
BAD_WORDS_MIN_SHAPE = (8, 4)


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt + outputs known on the host
    num_prompt_tokens: int
    sampling_params: SamplingParams
    seed: int
    page_ids: list[int]
    num_computed_tokens: int = 0
    # Outputs sampled on device whose value is not on the host yet (0 or 1 with one step in flight).
    num_pending: int = 0
    # Row of this request's token in the last dispatched step's sampled-token array.
    last_sampled_row: int = -1
    needs: SamplerNeeds = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.needs = SamplerNeeds.of(self.sampling_params)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_outputs(self) -> int:
        """Output tokens sampled so far, pending ones included."""
        return len(self.token_ids) - self.num_prompt_tokens + self.num_pending


@dataclass
class StepArrays:
    """One step's padded host arrays (the order of rows is the order of `req_ids`)."""

    input_ids: np.ndarray  # [T] i32
    positions: np.ndarray  # [T] i32
    slot_mapping: np.ndarray  # [T] i32
    placeholder_rows: np.ndarray  # [T] i32; -1 = the input id is real
    cu_q_lens: np.ndarray  # [S + 1] i32
    kv_lens: np.ndarray  # [S] i32
    page_indices: np.ndarray  # [S, P] i32
    num_seqs: np.ndarray  # [1] i32
    logits_indices: np.ndarray  # [S] i32
    req_ids: list[str]
    samples: list[bool]  # per row: this step reaches the end of the known tokens
    prompt_logprob_rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # req -> token range


def _seed_of(req_id: str, params: SamplingParams, base_seed: int) -> int:
    if params.seed is not None:
        return params.seed & 0xFFFFFFFF
    # The engine gives every request a seed; this is a fallback for direct runner use.
    return (hash(req_id) ^ base_seed) & 0xFFFFFFFF


class InputBatch:
    """Per-request state held by the runner across steps, and the step's padded host arrays.

    NOTE: each request owns a row of a persistent block table [rows, max_pages], written only
    when pages are added, so a step gathers its page table with one fancy index instead of
    rebuilding it request by request (vLLM's persistent batch).
    """

    def __init__(self, page_size: int, num_pages: int, base_seed: int, max_pages: int, capacity: int = 64):
        self.page_size = page_size
        self.null_slot = num_pages * page_size  # out of range: the K/V write drops it
        self.base_seed = base_seed
        self.requests: dict[str, CachedRequestState] = {}
        self.block_table = np.zeros((capacity, max_pages), np.int32)  # [rows, max_pages]
        self.row_of: dict[str, int] = {}
        self.free_rows = list(range(capacity - 1, -1, -1))

    def update(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            if self.requests.pop(req_id, None) is not None:
                self.free_rows.append(self.row_of.pop(req_id))
        for new in sched.new_requests:
            self._add(new)
        for cached in sched.cached_requests:
            self._update(cached)

    def _add(self, new: NewRequestData) -> None:
        tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
        self.requests[new.req_id] = CachedRequestState(
            req_id=new.req_id,
            token_ids=tokens,
            num_prompt_tokens=len(new.prompt_token_ids),
            sampling_params=new.sampling_params,
            seed=_seed_of(new.req_id, new.sampling_params, self.base_seed),
            page_ids=list(new.page_ids),
            num_computed_tokens=new.num_computed_tokens,
        )
        if not self.free_rows:  # grow the block table
            old = self.block_table.shape[0]
            self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self.row_of[new.req_id] = self.free_rows.pop()
        self.block_table[row, : len(new.page_ids)] = new.page_ids

    def _update(self, cached: CachedRequestData) -> None:
        state = self.requests[cached.req_id]
        if cached.new_page_ids:
            row, have = self.row_of[cached.req_id], len(state.page_ids)
            self.block_table[row, have : have + len(cached.new_page_ids)] = cached.new_page_ids
            state.page_ids.extend(cached.new_page_ids)
        state.num_computed_tokens = cached.num_computed_tokens

    def build(self, sched: SchedulerOutput, num_tokens: int, num_slots: int, pages_per_seq: int) -> StepArrays:
        """Pad the scheduled work into [T] tokens and [S] request slots (T, S, P: the bucket)."""
        order = [r.req_id for r in sched.new_requests] + [r.req_id for r in sched.cached_requests]
        num_reqs = len(order)
        counts = np.fromiter((sched.num_scheduled_tokens[r] for r in order), np.int32, num_reqs)
        states = [self.requests[r] for r in order]
        starts = np.fromiter((s.num_computed_tokens for s in states), np.int32, num_reqs)
        total = int(counts.sum())
        input_ids = np.zeros(num_tokens, np.int32)
        placeholder_rows = np.full(num_tokens, -1, np.int32)
        samples: list[bool] = []
        prompt_rows: dict[str, tuple[int, int]] = {}
        offset = 0
        for state, n, start in zip(states, counts.tolist(), starts.tolist(), strict=True):
            end = start + n
            known = state.token_ids
            if n == 1 and start < len(known):  # the common decode: one known token
                input_ids[offset] = known[start]
            else:
                known_end = min(end, len(known))
                input_ids[offset : offset + known_end - start] = known[start:known_end]
                if known_end < end:  # the last input is the previous step's sample, still on device
                    if end - known_end != 1 or state.last_sampled_row < 0:
                        raise RuntimeError(f"request {state.req_id}: scheduled past its known tokens")
                    placeholder_rows[offset + n - 1] = state.last_sampled_row
            samples.append(end == state.num_tokens)
            if state.sampling_params.prompt_logprobs is not None and start < state.num_prompt_tokens:
                prompt_rows[state.req_id] = (offset, offset + min(n, state.num_prompt_tokens - start))
            offset += n
        # Vectorised per-token metadata.
        rows = np.fromiter((self.row_of[r] for r in order), np.int32, num_reqs)
        cu_q_lens = np.zeros(num_slots + 1, np.int32)
        np.cumsum(counts, out=cu_q_lens[1 : num_reqs + 1])
        cu_q_lens[num_reqs + 1 :] = total
        positions = np.zeros(num_tokens, np.int32)
        positions[:total] = np.repeat(starts - cu_q_lens[:num_reqs], counts) + np.arange(total, dtype=np.int32)
        slot_mapping = np.full(num_tokens, self.null_slot, np.int32)
        pos = positions[:total]
        page = self.page_size
        slot_mapping[:total] = self.block_table[np.repeat(rows, counts), pos // page] * page + pos % page
        kv_lens = np.zeros(num_slots, np.int32)
        kv_lens[:num_reqs] = starts + counts
        page_indices = np.zeros((num_slots, pages_per_seq), np.int32)
        page_indices[:num_reqs] = self.block_table[rows, :pages_per_seq]
        logits_indices = np.zeros(num_slots, np.int32)
        logits_indices[:num_reqs] = cu_q_lens[1 : num_reqs + 1] - 1
        return StepArrays(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            placeholder_rows=placeholder_rows,
            cu_q_lens=cu_q_lens,
            kv_lens=kv_lens,
            page_indices=page_indices,
            num_seqs=np.array([num_reqs], np.int32),
            logits_indices=logits_indices,
            req_ids=order,
            samples=samples,
            prompt_logprob_rows=prompt_rows,
        )

    def advance(self, sched: SchedulerOutput, arrays: StepArrays) -> None:
        """After dispatch: count the scheduled tokens as computed and the samples as pending."""
        for row, req_id in enumerate(arrays.req_ids):
            state = self.requests[req_id]
            state.num_computed_tokens += sched.num_scheduled_tokens[req_id]
            if arrays.samples[row]:
                state.num_pending += 1
                state.last_sampled_row = row
            else:
                state.last_sampled_row = -1

    def receive(self, req_ids: list[str], rows: list[int], tokens: np.ndarray) -> None:
        """Sampled tokens reached the host: turn pending placeholders into real tokens."""
        for req_id, row in zip(req_ids, rows, strict=True):
            state = self.requests.get(req_id)
            if state is None or state.num_pending == 0:
                continue  # finished or preempted meanwhile
            state.token_ids.append(int(tokens[row]))
            state.num_pending -= 1


class LogprobNeeds(NamedTuple):
    """What one request asks of logprobs: its top `top_k` (-1: the whole vocabulary), or, where `top_k` is
    None, the logprobs of its logprob_token_ids."""

    top_k: int | None


class SamplerNeeds(NamedTuple):
    """What one request asks of the sampler, fixed for its life (min_tokens: only until it has them)."""

    greedy: bool
    top_k_top_p: bool  # top_k, top_p < 1 or min_p > 0 (sampled requests only)
    penalties: bool
    bias: bool  # logit_bias or allowed_token_ids
    logprobs: LogprobNeeds | None  # None: no logprobs
    min_tokens: bool
    bad_words: bool

    @classmethod
    def of(cls, p: SamplingParams) -> SamplerNeeds:
        return cls(
            greedy=p.greedy,
            top_k_top_p=not p.greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0),
            penalties=p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0,
            bias=bool(p.logit_bias) or p.allowed_token_ids is not None,
            logprobs=None if p.num_logprobs is None else LogprobNeeds(None if p.logprob_token_ids else p.logprobs),
            min_tokens=p.min_tokens > 0,
            bad_words=bool(p.bad_words_token_ids),
        )


def sampler_flags(states: list[CachedRequestState], bitmask_rows: bool, logprob_widths: LogprobWidths) -> SamplerFlags:
    """The sampler variant a step needs: the OR (all, for greedy) over its requests, the top-logprobs
    width that holds every request's.

    NOTE: per step and per request on the hot path, so each request's fixed needs are computed once
    (`CachedRequestState.needs`); only min_tokens changes as outputs arrive.
    """
    if not states:
        return SamplerFlags(bitmask=bitmask_rows)
    greedy, top, penalties, bias, logprobs, min_tokens, bad_words = zip(*(s.needs for s in states), strict=True)
    below_min = any(min_tokens) and any(s.num_outputs < s.sampling_params.min_tokens for s in states)
    width, token_ids = 0, False
    if any(logprobs):
        asked = [needs for needs in logprobs if needs is not None]
        width = logprob_widths.fitting([needs.top_k for needs in asked if needs.top_k is not None])
        token_ids = any(needs.top_k is None for needs in asked)
    return SamplerFlags(
        all_greedy=all(greedy),
        top_k_top_p=any(top),
        penalties=any(penalties),
        sparse_bias=any(bias) or below_min,
        bad_words=any(bad_words),
        bitmask=bitmask_rows,
        logprobs=any(logprobs),
        top_logprobs=width,
        logprob_token_ids=token_ids,
    )


def sampling_arrays(arrays: StepArrays, states: list[CachedRequestState], num_slots: int, flags: SamplerFlags,
                    grammar_bitmask: dict[str, np.ndarray], vocab_size: int, max_model_len: int) -> SamplingBatch:
    """Per-row sampling tensors (numpy) for the step's rows; optional fields only when flagged."""
    n = len(states)
    params = [s.sampling_params for s in states]

    def col(values, dtype, fill):
        out = np.full(num_slots, fill, dtype)
        out[:n] = values
        return out

    batch = SamplingBatch(
        # Greedy rows at 0, so a sampling variant (a mixed batch, a stand-in) takes their argmax exactly.
        temperature=col([0.0 if s.needs.greedy else s.sampling_params.temperature for s in states], np.float32, 0.0),
        seeds=col([s.seed for s in states], np.uint32, 0),
        positions=col(arrays.kv_lens[:n], np.int32, 0),
    )
    if flags.top_k_top_p:
        batch.top_k = col([min(p.top_k, vocab_size) for p in params], np.int32, 0)  # any k >= V: all of it
        batch.top_p = col([p.top_p for p in params], np.float32, 1.0)
        batch.min_p = col([p.min_p for p in params], np.float32, 0.0)
    if flags.penalties:
        batch.presence_penalty = col([p.presence_penalty for p in params], np.float32, 0.0)
        batch.frequency_penalty = col([p.frequency_penalty for p in params], np.float32, 0.0)
        batch.repetition_penalty = col([p.repetition_penalty for p in params], np.float32, 1.0)
        outs = np.full((num_slots, max_model_len), -1, np.int32)
        prompts = np.full((num_slots, max_model_len), -1, np.int32)
        # NOTE: a stand-in's step may have penalties on with no row using them: neutral values ignore the tables.
        for i, s in enumerate(states if any(s.needs.penalties for s in states) else ()):
            o = s.output_token_ids
            outs[i, : len(o)] = o
            prompts[i, : s.num_prompt_tokens] = s.token_ids[: s.num_prompt_tokens]
        batch.output_tokens, batch.prompt_tokens = outs, prompts
    if flags.sparse_bias:
        batch.bias_ids, batch.bias_values, batch.allowed_only = _sparse_bias(states, num_slots)
    if flags.bad_words:  # prev_tokens: the runner's, on device
        batch.bad_word_ids, batch.recent_outputs, batch.pending_rows = _bad_words(states, num_slots)
    if flags.bitmask:
        words = -(-vocab_size // 32)
        mask = np.full((num_slots, words), -1, np.int32)
        for i, req_id in enumerate(arrays.req_ids):
            if req_id in grammar_bitmask:
                mask[i] = grammar_bitmask[req_id]
        batch.bitmask = mask
    if flags.logprob_token_ids:
        ids = np.full((num_slots, MAX_LOGPROB_TOKEN_IDS), -1, np.int32)
        for i, p in enumerate(params):
            ids[i, : len(p.logprob_token_ids or ())] = p.logprob_token_ids or ()
        batch.logprob_token_ids = ids
    return batch


def _sparse_bias(states: list[CachedRequestState], num_slots: int):
    """[S, K] (ids, values) added to the logits, and whether a row may only use its listed ids:
    logit_bias, allowed_token_ids, and stop ids banned until min_tokens."""
    rows: list[tuple[list[int], list[float], bool]] = []
    for s in states:
        p = s.sampling_params
        ids: list[int] = []
        values: list[float] = []
        if s.num_outputs < p.min_tokens:
            stop_ids = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else p.all_stop_token_ids))
            ids += stop_ids
            values += [-np.inf] * len(stop_ids)
        for tok, bias in (p.logit_bias or {}).items():
            ids.append(tok)
            values.append(bias)
        allowed = p.allowed_token_ids is not None
        if allowed:
            extra = [t for t in p.allowed_token_ids if t not in (p.logit_bias or {})]
            ids += extra
            values += [0.0] * len(extra)
        rows.append((ids, values, allowed))
    width = _power_of_two_at_least(max(len(r[0]) for r in rows), 16)
    bias_ids = np.full((num_slots, width), -1, np.int32)
    bias_values = np.zeros((num_slots, width), np.float32)
    allowed_only = np.zeros(num_slots, bool)
    for i, (ids, values, allowed) in enumerate(rows):
        bias_ids[i, : len(ids)] = ids
        bias_values[i, : len(values)] = values
        allowed_only[i] = allowed
    return bias_ids, bias_values, allowed_only


def _bad_words(states: list[CachedRequestState], num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[S, W, L] each row's bad words right-aligned (-1 elsewhere), [S, L-1] its last L-1 output tokens (-1 before
    the first), [S] the row of its last output in the previous step's tokens where that is still on the device
    (-1: none; its column in the outputs is then a placeholder). W and L: powers of two, BAD_WORDS_MIN_SHAPE at least.

    NOTE: with async scheduling the previous step's token is read on device, so the match is exact without a wait."""
    words = [s.sampling_params.bad_words_token_ids or [] for s in states]
    min_words, min_length = BAD_WORDS_MIN_SHAPE
    num_words = _power_of_two_at_least(max(map(len, words)), min_words)
    length = _power_of_two_at_least(max((len(w) for row in words for w in row), default=1), min_length)
    ids = np.full((num_slots, num_words, length), -1, np.int32)
    recent = np.full((num_slots, length - 1), -1, np.int32)
    pending_rows = np.full(num_slots, -1, np.int32)
    for i, (state, row) in enumerate(zip(states, words, strict=True)):
        if not row:
            continue
        for j, word in enumerate(row):
            ids[i, j, length - len(word) :] = word
        known_end = length - 1 - state.num_pending  # the pending output (0 or 1) goes after the known ones
        tokens = state.token_ids
        tail = tokens[max(state.num_prompt_tokens, len(tokens) - known_end) :]
        recent[i, known_end - len(tail) : known_end] = tail
        if state.num_pending:
            pending_rows[i] = state.last_sampled_row
    return ids, recent, pending_rows


def _power_of_two_at_least(count: int, floor: int) -> int:
    width = floor
    while width < count:
        width *= 2
    return width
