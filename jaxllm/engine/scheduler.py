"""Continuous-batching scheduler: one token budget per step, running requests first, then FCFS.

Each step hands out at most `max_num_batched_tokens` query tokens to at most `max_num_seqs`
requests: first to running requests (a decode, or the next chunk of a chunked prefill), then to
waiting ones in arrival order (a prefill that does not fit the remaining budget is chunked). When
a running request cannot get a page, the newest running request is preempted (its pages freed, it
goes back to the front of the waiting queue and is recomputed later), possibly itself.

NOTE: `num_computed_tokens` advances when a step is scheduled, not when it returns (vLLM v1). A
step whose tokens reach the end of a request's known tokens samples; until the sampled token is
on the host it is an output placeholder. Both modes of the engine use this one path: in
synchronous mode the placeholder is resolved before the next schedule; in async scheduling the
next step may already schedule a decode whose input is the placeholder (the runner substitutes
the real token on the device). Tokens sampled for requests that finished meanwhile are dropped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from jaxllm.config import EngineLimits
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.interfaces import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from jaxllm.engine.request import Request, RequestStatus


@dataclass(slots=True)
class SampledToken:
    request: Request
    token_id: int
    logprobs: TokenLogprobs | None


class Scheduler:
    def __init__(self, limits: EngineLimits, block_manager: BlockManager, vocab_size: int) -> None:
        self.max_num_seqs = limits.max_num_seqs
        self.max_num_batched_tokens = limits.max_num_batched_tokens
        self.max_model_len = limits.max_model_len
        self.block_manager = block_manager
        self.vocab_size = vocab_size
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first
        self._finished_req_ids: set[str] = set()  # to report to the runner once
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def has_schedulable_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def num_free_seats(self) -> int:
        """How many more requests may be added before one would wait for a seat (running or queued ahead)."""
        return max(0, self.max_num_seqs - len(self.running) - len(self.waiting))

    def finish_request(self, req_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request: its pages are freed at once. Returns it, or None if unknown."""
        request = self.requests.pop(req_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = status
        request.finished_time = time.monotonic()
        self._finished_req_ids.add(req_id)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> SchedulerOutput:
        self.block_manager.begin_step()
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached_requests: list[CachedRequestData] = []
        new_requests: list[NewRequestData] = []
        preempted = False

        # Running requests: decodes and continuing chunked prefills, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.block_manager.can_append(request, num_new):
                victim = self.running.pop()  # the newest; never one already scheduled this step
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                new_pages = self.block_manager.append_slots(request, num_new)
                cached_requests.append(CachedRequestData(request.req_id, new_pages, request.num_computed_tokens))
                num_scheduled[request.req_id] = num_new
                budget -= num_new
                i += 1

        # Waiting requests, first come first served; none in a step that had to preempt (vLLM).
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.num_output_placeholders:
                break  # preempted while its last sample was in flight: wait for that token
            hit = self.block_manager.find_cached_prefix(request)
            if hit.pending:
                break
            num_new = min(request.num_tokens - hit.num_tokens, budget)
            if not self.block_manager.can_allocate(request, num_new, hit):
                break
            page_ids = self.block_manager.allocate(request, num_new, hit)
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = hit.num_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = hit.num_tokens
                request.first_scheduled_time = time.monotonic()
            new_requests.append(NewRequestData(
                req_id=request.req_id, prompt_token_ids=list(request.prompt_token_ids),
                sampling_params=request.sampling_params, page_ids=page_ids, num_computed_tokens=hit.num_tokens,
                output_token_ids=list(request.output_token_ids)))
            num_scheduled[request.req_id] = num_new
            budget -= num_new

        total = sum(num_scheduled.values())
        output = SchedulerOutput(new_requests, cached_requests, num_scheduled, total)
        if total:  # an empty step is not run: keep the finished ids for the next one
            output.finished_req_ids, self._finished_req_ids = self._finished_req_ids, set()
        output.structured_req_ids = self._advance_scheduled(num_scheduled)
        return output

    def grammar_bitmask(self, output: SchedulerOutput) -> dict[str, np.ndarray]:
        """Allowed-token masks [ceil(vocab / 32)] int32 of the step's constrained requests, from their
        grammars' current state (call after the previous step's tokens were accepted). Requests that
        finished meanwhile get none: their token is dropped."""
        bitmasks = {}
        for req_id in output.structured_req_ids:
            request = self.requests.get(req_id)
            if request is None or request.grammar is None:
                continue
            bitmask = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
            request.grammar.fill_bitmask(bitmask)
            bitmasks[req_id] = bitmask
        return bitmasks

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[SampledToken]:
        """Resolve a step's placeholders with its sampled tokens; returns those of unfinished requests."""
        sampled = []
        logprobs = runner_output.logprobs or [None] * len(runner_output.req_ids)
        for req_id, token_id, token_logprobs in zip(runner_output.req_ids, runner_output.sampled_token_ids,
                                                    logprobs, strict=True):
            request = self.requests.get(req_id)
            if request is None or request.num_output_placeholders == 0:
                continue  # finished or aborted while this step ran (or an id reused since): dropped
            request.num_output_placeholders -= 1
            request.output_token_ids.append(token_id)
            sampled.append(SampledToken(request, token_id, token_logprobs))
        return sampled

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        if len(request.output_token_ids) + request.num_output_placeholders >= request.max_tokens:
            return 0  # its last token is in flight: it finishes when that arrives
        target = request.num_tokens + request.num_output_placeholders
        return max(0, min(target - request.num_computed_tokens, budget,
                          self.max_model_len - request.num_computed_tokens))

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)
        self._finished_req_ids.add(request.req_id)
        self.num_preemptions += 1
        request.num_preemptions += 1

    def _advance_scheduled(self, num_scheduled: dict[str, int]) -> list[str]:
        """Move num_computed_tokens past this step; a request that samples gets a placeholder.
        Returns the constrained requests among those that sample."""
        structured = []
        for req_id, num_new in num_scheduled.items():
            request = self.requests[req_id]
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1
                if request.grammar is not None:
                    structured.append(req_id)
        return structured
