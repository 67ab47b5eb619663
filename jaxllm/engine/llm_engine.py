"""`LLMEngine`: validated requests in, `EngineOutput`s out, one `step()` at a time (single thread, no jax).

    step: schedule -> runner.execute -> [async: finish the previous step] -> [constrained requests:
          their masks, then the sampling] -> scheduler.update_from_output -> detokenize, check stops
          -> free finished -> outputs

A user request with `n > 1` becomes n child requests ("{i}_{request_id}") sharing the prompt, so
the prefix cache shares its pages; their outputs are gathered into one `EngineOutput`. The children are
made as they enter the scheduler, one at a time while it has a free seat, in turn with other requests'
(`jaxllm.engine.admission`): a big `n` or a long prompt list never queues a later request behind all of
it, and adding one costs the loop nothing per child. The loop that feeds and steps the engine is
`jaxllm.engine.core.EngineCore`.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jaxllm.config import EngineConfig, EngineLimits
from jaxllm.engine.admission import Admission
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.detokenizer import Finish, OutputDetokenizer
from jaxllm.engine.interfaces import ModelRunnerOutput, ModelRunnerProtocol, SchedulerOutput, StepHandle, TokenLogprobs
from jaxllm.engine.live_status import LIVE_STATUS_INTERVAL_S, MAX_LISTED_REQUESTS, LiveRequest, LiveStatus
from jaxllm.engine.metrics import EngineMetrics, FinishedRequest
from jaxllm.engine.request import Request, RequestStatus
from jaxllm.engine.scheduler import SampledToken, Scheduler
from jaxllm.outputs import EngineOutput, Logprob, SequenceOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from jaxllm.engine.core import AddRequest

logger = logging.getLogger(__name__)

LOG_STATS_INTERVAL_S = 5.0  # between the periodic stats lines
MAX_RANDOM_SEED = 2**31 - 1

# SamplingParams (with the engine's stop ids) -> a compiled grammar: `.new_matcher()` gives each request its
# `Grammar` (`jaxllm.structured.make_grammar_compiler`). Raises ValueError for a spec it cannot compile.
GrammarCompiler = Callable[[SamplingParams], Any]

_FINISH_STATUS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH}


@dataclass
class _Sequence:
    """One child request and what has been sent of it."""

    request: Request
    index: int
    detokenizer: OutputDetokenizer
    logprobs: list[dict[int, Logprob]] | None  # None unless sampling_params.num_logprobs
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    sent_final: bool = False


@dataclass
class _Group:
    """One user request: its n sequences and how its outputs are reported."""

    command: AddRequest
    first_seed: int  # sequence i samples with seed first_seed + i
    num_unfinished: int  # of its n sequences, those not let in yet included
    awaiting_grammar: bool  # its sequences wait for `grammar_ready` before they are let in
    grammar: Any = None  # the compiled grammar: each sequence gets a matcher of it
    sequences: list[_Sequence] = field(default_factory=list)  # those let in so far, by index
    changed: dict[int, _Sequence] = field(default_factory=dict)  # by index: those with news since the last output
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # position 0 is None
    sent_prompt_logprobs: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_wall_time: float = field(default_factory=time.time)
    error: str | None = None  # why it failed (finish_reason "error")

    @property
    def request_id(self) -> str:
        return self.command.request_id

    @property
    def source(self) -> str:
        """Whose turn its sequences take in `Admission`: a prompt list's shared source, else its own id."""
        return self.command.source or self.command.request_id

    @property
    def output_kind(self) -> RequestOutputKind:
        return self.command.params.output_kind

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.command.prompt_token_ids

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


class LLMEngine:
    def __init__(self, config: EngineConfig, limits: EngineLimits, runner: ModelRunnerProtocol,
                 tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Iterable[int], *,
                 log_stats: bool = True, grammar_compiler: GrammarCompiler | None = None) -> None:
        self.config = config
        self.limits = limits
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = limits.max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.log_stats = log_stats
        self.grammar_compiler = grammar_compiler
        self.async_scheduling = limits.async_scheduling
        self.stream_interval = max(1, config.scheduler.stream_interval)
        self.block_manager = BlockManager(limits.num_pages, limits.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(limits, self.block_manager, vocab_size)
        self.metrics = EngineMetrics(limits.max_model_len)
        # NOTE: requests without a seed get one from here, so the runner can key all sampling by
        # (seed, position) and a run is reproducible from config.model.seed.
        self._seed_rng = random.Random(config.model.seed)
        self._groups: dict[str, _Group] = {}
        self._admission: Admission[_Group] = Admission()
        self._num_awaiting_grammar = 0  # sequences of the groups waiting for their grammar
        self._sequences: dict[str, tuple[_Group, _Sequence]] = {}  # child request id -> its group
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self._changed: dict[str, _Group] = {}  # groups with something to report, in order
        self._token_text_cache: dict[int, str] = {}
        self._live_status = (float("-inf"), LiveStatus())  # (time.monotonic() when read, what was read)
        self._last_stats = (time.monotonic(), 0, 0)  # (time, prompt tokens, generation tokens)
        self._update_gauges()

    # ---- requests in ----

    def add_request(self, command: AddRequest) -> None:
        """Queue a validated request (`EngineInfo.new_request`); its sequences are let into the scheduler by
        later steps. With structured outputs they wait for `grammar_ready` (or `fail_request`) first."""
        request_id, params = command.request_id, command.params
        if request_id in self._groups:
            raise ValueError(f"Request id {request_id} is already running.")
        n = params.n
        first_seed = params.seed if params.seed is not None else self._seed_rng.randint(0, MAX_RANDOM_SEED - n + 1)
        group = _Group(command, first_seed, num_unfinished=n, awaiting_grammar=params.structured_outputs is not None)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        self._groups[request_id] = group
        if group.awaiting_grammar:
            self._num_awaiting_grammar += n
        else:
            self._admission.add(group.source, group, n)

    def _new_sequence(self, group: _Group, index: int) -> _Sequence:
        """Make the group's sequence `index` (its request, not yet in the scheduler)."""
        command, params = group.command, group.command.params
        child = params.clone(n=1, seed=group.first_seed + index, all_stop_token_ids=set(self.eos_token_ids))
        child_id = command.request_id if params.n == 1 else f"{index}_{command.request_id}"
        request = Request(child_id, command.prompt_token_ids, child, command.max_tokens,
                          arrival_time=group.arrival_time, cache_salt=command.cache_salt)
        if group.grammar is not None:
            request.grammar = group.grammar.new_matcher()
        wants_logprobs = child.num_logprobs is not None
        sequence = _Sequence(request, index,
                             OutputDetokenizer(self.tokenizer, command.prompt_token_ids, child, command.max_tokens,
                                               self.max_model_len,
                                               defer_text=params.output_kind == RequestOutputKind.FINAL_ONLY),
                             [] if wants_logprobs else None, 0.0 if wants_logprobs else None)
        group.sequences.append(sequence)
        self._sequences[child_id] = (group, sequence)
        return sequence

    def _let_in(self) -> None:
        """Let queued sequences into the scheduler while it has free seats, in turn by source (`Admission`)."""
        for _ in range(self.scheduler.num_free_seats()):
            taken = self._admission.take()
            if taken is None:
                return
            group, index = taken
            self.scheduler.add_request(self._new_sequence(group, index).request)

    def compile_grammar(self, params: SamplingParams) -> Any:
        """The compiled grammar of a request's structured outputs, ending on this engine's stop ids
        (`EngineCore` calls it on a worker thread)."""
        assert self.grammar_compiler is not None, "validation refuses structured outputs without a grammar backend"
        return self.grammar_compiler(params.clone(all_stop_token_ids=set(self.eos_token_ids)))

    def is_waiting_for_grammar(self, request_id: str) -> bool:
        group = self._groups.get(request_id)
        return group is not None and group.awaiting_grammar

    def grammar_ready(self, request_id: str, grammar: Any) -> None:
        """The request's grammar has compiled: its sequences, each with a matcher of it, may be let in."""
        group = self._groups[request_id]
        group.grammar, group.awaiting_grammar = grammar, False
        self._num_awaiting_grammar -= group.command.params.n
        self._admission.add(group.source, group, group.command.params.n)

    def fail_request(self, request_id: str, error: str) -> None:
        """End a request with an error (its grammar did not compile): finish_reason "error", `error` reported."""
        group = self._groups.get(request_id)
        if group is None:
            return
        group.error = error
        self._end(group, RequestStatus.FINISHED_ERROR, Finish("error"))

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (user request ids): their pages are freed now; the next step() reports them."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self._groups.get(request_id)
            if group is not None:
                self._end(group, RequestStatus.FINISHED_ABORTED, Finish("abort"))

    def _end(self, group: _Group, status: RequestStatus, finish: Finish) -> None:
        for sequence in group.sequences:
            if sequence.finish_reason is None:
                self.scheduler.finish_request(sequence.request.req_id, status)
                self._finish(group, sequence, finish)
        if group.awaiting_grammar:
            group.awaiting_grammar = False
            self._num_awaiting_grammar -= group.command.params.n
            never_let_in = range(group.command.params.n)
        else:
            never_let_in = self._admission.remove(group.source, group)
        for index in never_let_in:  # reported as ended too, as vLLM reports each of the n
            self._finish(group, self._new_sequence(group, index), finish)
        self._changed[group.request_id] = group

    def start_background_work(self) -> None:
        """Start the runner's background work (a served engine's buckets still to load)."""
        self.runner.start_background_work()

    def shutdown(self) -> None:
        """Stop the runner's background work (buckets still loading)."""
        self.runner.shutdown()

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups) or self._in_flight is not None

    def needs_step(self) -> bool:
        """Whether `step()` has anything to do: a step in flight, outputs to report, or requests to let in or
        schedule (those waiting for their grammar alone are not)."""
        return (self._in_flight is not None or bool(self._changed) or self.scheduler.has_schedulable_requests()
                or self._admission.num_pending > 0)

    # ---- the step ----

    def step(self) -> list[EngineOutput]:
        self._let_in()
        scheduler_output = self.scheduler.schedule()
        handle = None if scheduler_output.is_empty else self.runner.execute(scheduler_output)
        if self._in_flight is not None:
            self._finish_in_flight()
        if handle is not None:
            self.metrics.step_scheduled(scheduler_output.total_num_scheduled_tokens)
            if scheduler_output.structured_req_ids:
                # NOTE: the masks need the previous step's tokens, accepted just above; they are
                # computed here while this step's forward runs, and only its sampling waits for them.
                scheduler_output.grammar_bitmask = self.scheduler.grammar_bitmask(scheduler_output)
                handle.sample(scheduler_output.grammar_bitmask)
            self._in_flight = (scheduler_output, handle)
            if not self.async_scheduling:
                self._finish_in_flight()
        outputs = [out for group in self._changed.values() if (out := self._make_output(group)) is not None]
        self._changed.clear()
        self._update_gauges()
        return outputs

    def _finish_in_flight(self) -> None:
        assert self._in_flight is not None
        scheduler_output, handle = self._in_flight
        self._in_flight = None
        runner_output = handle.result()
        self._collect_prompt_logprobs(scheduler_output, runner_output)
        now = time.monotonic()
        for sampled in self.scheduler.update_from_output(scheduler_output, runner_output):
            self._process_token(sampled, now)

    def _process_token(self, sampled: SampledToken, now: float) -> None:
        request = sampled.request
        group, sequence = self._sequences[request.req_id]
        if request.grammar is not None:
            request.grammar.accept_token(sampled.token_id)
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.first_token(now - request.arrival_time, len(request.prompt_token_ids),
                                     max(request.num_cached_tokens, 0))
        else:
            self.metrics.next_token(now - (request.last_token_time or now))
        request.last_token_time = now
        if sequence.logprobs is not None and sampled.logprobs is not None:
            sequence.logprobs.append(self._logprob_dict(sampled.logprobs, sampled.token_id))
            sequence.cumulative_logprob = (sequence.cumulative_logprob or 0.0) + sampled.logprobs.sampled_logprob
        finish = sequence.detokenizer.update([sampled.token_id])
        if finish is not None:
            self.scheduler.finish_request(request.req_id, _FINISH_STATUS[finish.reason])
            self._finish(group, sequence, finish)
        group.changed[sequence.index] = sequence
        self._changed[group.request_id] = group

    def _finish(self, group: _Group, sequence: _Sequence, finish: Finish) -> None:
        sequence.finish_reason, sequence.stop_reason = finish.reason, finish.stop_reason
        group.num_unfinished -= 1
        group.changed[sequence.index] = sequence
        self.metrics.request_finished(finish.reason, FinishedRequest.of(sequence.request, time.monotonic()))

    def _collect_prompt_logprobs(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        if not runner_output.prompt_logprobs:
            return
        start_of = {new.req_id: new.num_computed_tokens for new in scheduler_output.new_requests}
        start_of.update({cached.req_id: cached.num_computed_tokens for cached in scheduler_output.cached_requests})
        for req_id, entries in runner_output.prompt_logprobs.items():
            group, sequence = self._sequences.get(req_id, (None, None))
            if group is None or group.prompt_logprobs is None or sequence.index != 0:
                continue  # siblings compute the same prompt: the first one reports it
            prompt = group.prompt_token_ids
            for offset, entry in enumerate(entries):
                position = start_of[req_id] + offset  # describes prompt token position + 1
                # Positions arrive again when a preempted request recomputes its prompt: keep the first.
                if position + 1 == len(group.prompt_logprobs) and position + 1 < len(prompt):
                    group.prompt_logprobs.append(self._logprob_dict(entry, prompt[position + 1]))

    # ---- outputs ----

    def _make_output(self, group: _Group) -> EngineOutput | None:
        kind = group.output_kind
        finished = group.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        # NOTE: a delta reports only the sequences with news: going over all n each step made a fan-out's
        # steps cost O(n) each.
        reported = [group.changed[index] for index in sorted(group.changed)] if delta else group.sequences
        group.changed.clear()
        sequences = [out for sequence in reported if (out := self._sequence_output(sequence, delta))]
        if delta and not sequences:
            return None
        if finished:
            del self._groups[group.request_id]
            self.metrics.user_request_finished(
                group.command.params.n, max((len(seq.request.output_token_ids) for seq in group.sequences), default=0))
            for sequence in group.sequences:
                self._sequences.pop(sequence.request.req_id, None)
        prompt_logprobs = group.prompt_logprobs
        if delta:
            prompt_logprobs = None if group.sent_prompt_logprobs else prompt_logprobs
            group.sent_prompt_logprobs = True
        first = group.sequences[0].request
        return EngineOutput(group.request_id, sequences, finished, max(first.num_cached_tokens, 0), prompt_logprobs,
                            self._request_metrics(group) if finished else None, group.error)

    def _sequence_output(self, sequence: _Sequence, delta: bool) -> SequenceOutput | None:
        """The sequence's output (delta: what is new, or None when there is nothing to send yet)."""
        if sequence.sent_final:
            return None if delta else self._cumulative(sequence)
        token_ids = sequence.detokenizer.token_ids
        finished = sequence.finish_reason is not None
        num_new_tokens = len(token_ids) - sequence.num_sent_tokens
        if delta and not finished and num_new_tokens < self.stream_interval:
            return None
        text = sequence.detokenizer.text_to_emit()
        start_chars, start_tokens = sequence.num_sent_chars, sequence.num_sent_tokens
        sequence.num_sent_chars, sequence.num_sent_tokens = len(text), len(token_ids)
        sequence.sent_final = finished
        if not delta:
            return self._cumulative(sequence)
        logprobs = None if sequence.logprobs is None else sequence.logprobs[start_tokens:]
        return SequenceOutput(sequence.index, text[start_chars:], token_ids[start_tokens:],
                              sequence.cumulative_logprob, logprobs, sequence.finish_reason, sequence.stop_reason)

    @staticmethod
    def _cumulative(sequence: _Sequence) -> SequenceOutput:
        logprobs = None if sequence.logprobs is None else list(sequence.logprobs)
        return SequenceOutput(sequence.index, sequence.detokenizer.text_to_emit(), list(sequence.detokenizer.token_ids),
                              sequence.cumulative_logprob, logprobs, sequence.finish_reason, sequence.stop_reason)

    def _request_metrics(self, group: _Group) -> dict[str, float]:
        request = group.sequences[0].request
        out = {"arrival_time": group.arrival_wall_time}
        if request.first_token_time is not None:
            out["time_to_first_token"] = request.first_token_time - request.arrival_time
        if request.finished_time is not None:
            out["e2e_latency"] = request.finished_time - request.arrival_time
        if request.first_scheduled_time is not None:
            out["queue_time"] = request.first_scheduled_time - request.arrival_time
        if request.first_token_time is not None and request.last_token_time is not None:
            out["decode_time"] = request.last_token_time - request.first_token_time
        return out

    def _logprob_dict(self, entry: TokenLogprobs, token_id: int) -> dict[int, Logprob]:
        """{token id: Logprob}: the chosen token first, then the top-k."""
        out = {token_id: Logprob(entry.sampled_logprob, entry.sampled_rank, self._token_text(token_id))}
        for rank, (top_id, logprob) in enumerate(zip(entry.token_ids, entry.logprobs, strict=True), start=1):
            if top_id not in out:
                out[top_id] = Logprob(logprob, rank, self._token_text(top_id))
        return out

    def _token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self._token_text_cache[token_id] = self.tokenizer.decode([token_id])
        return text

    # ---- statistics ----

    def metrics_snapshot(self) -> EngineMetrics:
        """A copy of the metrics for another thread or process, with the live status (requests, compiled
        buckets) read now."""
        snapshot = self.metrics.snapshot()
        read_at, snapshot.live = self._live_status
        now = time.monotonic()
        if now - read_at >= LIVE_STATUS_INTERVAL_S or not self._groups:
            # NOTE: list(islice(...)) runs in one C call, holding the GIL: AsyncEngine reads this from the HTTP
            # thread while the engine thread adds and removes groups.
            oldest = list(itertools.islice(self._groups.values(), MAX_LISTED_REQUESTS))
            snapshot.live = LiveStatus(tuple(_live_request(group) for group in oldest), len(self._groups),
                                       self.runner.compile_state())
            self._live_status = (now, snapshot.live)
        return snapshot

    def _update_gauges(self) -> None:
        scheduler, block_manager = self.scheduler, self.block_manager
        self.metrics.set_gauges(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + self._admission.num_pending + self._num_awaiting_grammar,
            deferred=self._num_awaiting_grammar,
            kv_cache_usage=block_manager.usage,
            num_free_pages=block_manager.num_free_pages, preemptions=scheduler.num_preemptions,
            prefix_cache_queries=block_manager.prefix_cache_queries, prefix_cache_hits=block_manager.prefix_cache_hits)
        if self.log_stats:
            self._maybe_log_stats()

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        last_time, last_prompt, last_generation = self._last_stats
        if now - last_time < LOG_STATS_INTERVAL_S:
            return
        m = self.metrics
        elapsed = now - last_time
        hit_rate = m.prefix_cache_hits_total / m.prefix_cache_queries_total if m.prefix_cache_queries_total else 0.0
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
            "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            (m.prompt_tokens_total - last_prompt) / elapsed, (m.generation_tokens_total - last_generation) / elapsed,
            m.num_requests_running, m.num_requests_waiting, 100 * m.kv_cache_usage, 100 * hit_rate)
        self._last_stats = (now, m.prompt_tokens_total, m.generation_tokens_total)


def _live_request(group: _Group) -> LiveRequest:
    running, output_tokens, computed_tokens = False, 0, 0
    for sequence in group.sequences:
        request = sequence.request
        running = running or request.status is RequestStatus.RUNNING
        output_tokens += len(request.output_token_ids)
        computed_tokens = max(computed_tokens, request.num_computed_tokens)
    state = "running" if running else "waiting_for_grammar" if group.awaiting_grammar else "waiting"
    prompt_tokens = len(group.prompt_token_ids)
    return LiveRequest(group.request_id, state, group.arrival_wall_time, prompt_tokens, group.command.params.n,
                       group.num_unfinished, output_tokens, min(computed_tokens, prompt_tokens))
