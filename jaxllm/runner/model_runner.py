"""The model runner: one step of the model on the devices, the hot path.

Be paranoid about adding lines here: everything in `execute` runs every step.

One step: pad the scheduled work to a precompiled bucket (`compilation.Buckets`: T tokens, S =
min(T, max_num_seqs) request slots, P pages per slot), ship its inputs (`ForwardInputs`) in one
transfer into buffers that keep their addresses from step to step (`step_inputs`: CUDA graphs
replay unchanged), run the bucket's compiled forward with the KV pages donated, sample on device,
and start copying the tokens back while the host goes on to prepare the next step.

What the step runs with is settled before the runner is built (`jaxllm.build`): the limits
(`limits`), the buckets and their compiled programs (`compilation`), the KV pool (`kv_cache`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import EngineLimits
from jaxllm.engine.interfaces import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from jaxllm.engine.live_status import CompileState
from jaxllm.runner import kv_cache
from jaxllm.runner.attention import Attention
from jaxllm.runner.compilation import BucketCompiler, Buckets, stand_in_sampler_flags, warm_sampler_flags
from jaxllm.runner.input_batch import InputBatch, StepArrays, sampler_flags, sampling_arrays
from jaxllm.runner.model_loading import LoadedModel
from jaxllm.runner.sampler import LogprobOutputs, LogprobWidths, SamplerFlags, SamplingBatch, logprob_outputs
from jaxllm.runner.step_inputs import ForwardInputs, StableInputs, split_tables
from jaxllm.sampling_params import SamplingParams


@dataclass
class _Step:
    """What a dispatched step left for the host to read back."""

    arrays: StepArrays
    tokens: jax.Array | None  # [max_num_seqs] i32, rows beyond S are padding; None until sampled
    logprobs: LogprobOutputs | None  # [S] rows
    prompt_logprobs: LogprobOutputs | None  # [T] rows: token p's describe token p + 1
    # Set while the sampling waits for grammar bitmasks (StepHandle.sample).
    pending: _PendingSample | None = None


@dataclass
class _PendingSample:
    logits: jax.Array  # [S, V] f32, on device
    sampling: SamplingBatch  # numpy, its bitmask rows all ones until sample()
    flags: SamplerFlags


class StepHandle:
    def __init__(self, runner: ModelRunner, step: _Step | None):
        self._runner = runner
        self._step = step
        self._result: ModelRunnerOutput | None = None

    def sample(self, grammar_bitmask: dict[str, np.ndarray]) -> None:
        self._runner._sample_pending(self._step, grammar_bitmask)

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self._runner._finish(self._step)
        return self._result


class ModelRunner:
    def __init__(self, model: LoadedModel, attention: Attention, buckets: Buckets, limits: EngineLimits, *,
                 max_logprobs: int, seed: int = 0, served: bool = False,
                 default_sampling: SamplingParams | None = None, kv_format: kv_cache.KvFormat | None = None):
        """max_logprobs: the most logprobs a request may ask for (-1: the whole vocabulary), which sets the
        top-logprobs widths compiled. default_sampling: what a request gets when it sets nothing (the
        model's generation config), whose sampler variant is then compiled at warm-up too. kv_format: what
        each layer's KV state holds (`kv_cache.kv_format`; None: pages of the model's dtype)."""
        self.model = model
        self.kv_format = kv_cache.KvFormat(model.dtype) if kv_format is None else kv_format
        self.attention, self.attention_name = attention, attention.name
        self.buckets = buckets
        self.page_size = limits.block_size
        self.max_model_len = limits.max_model_len
        self.vocab_size = model.arch.vocab_size
        self.logprob_widths = LogprobWidths.of(max_logprobs, self.vocab_size)
        self.compiler = BucketCompiler(model, attention, buckets, num_pages=limits.num_pages,
                                       max_model_len=limits.max_model_len,
                                       warm_samplers=warm_sampler_flags(default_sampling),
                                       stand_in=stand_in_sampler_flags(self.logprob_widths),
                                       kv_format=self.kv_format)
        self._inputs = StableInputs(self.compiler.sharding)
        self.kv_pages = kv_cache.allocate_kv_pages(model.arch, limits.num_pages, limits.block_size, self.kv_format,
                                                   model.mesh, model.rules)
        max_pages = -(-limits.max_model_len // limits.block_size)
        self.input_batch = InputBatch(limits.block_size, limits.num_pages, seed, max_pages, limits.max_num_seqs)
        self._prev_tokens = jax.device_put(np.zeros(limits.max_num_seqs, np.int32), self.compiler.sharding)
        # NOTE: served, a single process starts serving once its smallest bucket is ready and loads
        # the rest behind it (`start_background_work`, as the engine's loop starts); offline runs
        # and multi-process runs wait for every bucket.
        self.compiler.warm_up(background=served and jax.process_count() == 1)

    # ----- one step ------------------------------------------------------------------------

    def execute(self, sched: SchedulerOutput) -> StepHandle:
        self.input_batch.update(sched)
        if sched.total_num_scheduled_tokens == 0:
            return StepHandle(self, None)
        longest = max(len(self.input_batch.requests[r].page_ids) for r in sched.num_scheduled_tokens)
        num_tokens, pages_per_seq = self.buckets.pick(sched.total_num_scheduled_tokens, longest)
        num_slots = self.buckets.slots(num_tokens)
        # Before the inputs go over: a bucket still loading (served start-up) is waited for here,
        # with its input unpacking.
        forward = self.compiler.forward(num_tokens, pages_per_seq)
        arrays = self.input_batch.build(sched, num_tokens, num_slots, pages_per_seq)
        states = [self.input_batch.requests[r] for r in arrays.req_ids]
        want_prompt_logprobs = bool(arrays.prompt_logprob_rows)
        flags = self.compiler.runnable(num_slots, sampler_flags(states, bitmask_rows=bool(sched.structured_req_ids),
                                                                logprob_widths=self.logprob_widths))
        sampling = sampling_arrays(arrays, states, num_slots, flags, {}, self.vocab_size, self.max_model_len)

        logits_indices = arrays.logits_indices
        if want_prompt_logprobs:  # rare: every token's logits, rows for sampling picked afterwards
            logits_indices = np.arange(num_tokens, dtype=np.int32)
            forward = self.compiler.forward_all_logits(num_tokens, pages_per_seq)
        host = _forward_inputs(arrays, logits_indices)
        if flags.bitmask:  # the sampling columns go with the masks, in sample()
            (dev,) = self._inputs.put(host)
        else:
            dev, sampling = self._put_sampling(sampling, host)
        self.kv_pages, logits = forward(self.model.leaves, self.kv_pages, dev.batch(), dev.placeholder_rows,
                                        self._prev_tokens)
        prompt_lp = None
        if want_prompt_logprobs:
            targets = self._prompt_targets(arrays, num_tokens)
            width = self.logprob_widths.fitting([self.input_batch.requests[r].sampling_params.prompt_logprobs
                                                 for r in arrays.prompt_logprob_rows])
            prompt_lp = _prompt_logprobs(logits, jnp.asarray(targets), width)
            jax.tree.map(lambda a: a.copy_to_host_async(), prompt_lp)
            logits = logits[jnp.asarray(arrays.logits_indices)]  # [S, V]: the rows that sample
        self.input_batch.advance(sched, arrays)
        step = _Step(arrays, None, None, prompt_lp)
        if flags.bitmask:
            step.pending = _PendingSample(logits, sampling, flags)
        else:
            self._dispatch_sample(step, logits, sampling, flags)
        return StepHandle(self, step)

    def _prompt_targets(self, arrays: StepArrays, num_tokens: int) -> np.ndarray:
        """[T] i32: for row t, the token after t's position, whose prompt logprob row t's logits give.

        Called before `advance`: a request's computed count is still where its rows start."""
        targets = np.zeros(num_tokens, np.int32)
        targets[:-1] = arrays.input_ids[1:]
        # NOTE: a chunk that ends mid-prompt is followed in the step by the next request's tokens; its last
        # row's target is its own next prompt token instead.
        for req_id, (lo, hi) in arrays.prompt_logprob_rows.items():
            state = self.input_batch.requests[req_id]
            after = state.num_computed_tokens + hi - lo
            if after < len(state.token_ids):
                targets[hi - 1] = state.token_ids[after]
        return targets

    def _sample_pending(self, step: _Step | None, grammar_bitmask: dict[str, np.ndarray]) -> None:
        """The sampling of a step with constrained requests, once their masks are known."""
        assert step is not None and step.pending is not None, "sample() on a step without constrained requests"
        pending, step.pending = step.pending, None
        mask = pending.sampling.bitmask  # [S, ceil(V / 32)] i32, all ones
        for i, req_id in enumerate(step.arrays.req_ids):
            row = grammar_bitmask.get(req_id)
            if row is not None:
                mask[i] = row
        (sampling,) = self._put_sampling(pending.sampling)
        self._dispatch_sample(step, pending.logits, sampling, pending.flags)

    def _put_sampling(self, sampling: SamplingBatch, *before: Any) -> tuple:
        """(*before, sampling) on the device: `before` and the per-row columns in one transfer
        into stable buffers, the [S, X] tables (token histories, biases, bitmasks) plainly."""
        columns, tables = split_tables(sampling)
        *out, columns = self._inputs.put(*before, columns)
        if tables:
            columns = dataclasses.replace(columns, **jax.device_put(tables, self.compiler.sharding))
        return (*out, columns)

    def _dispatch_sample(self, step: _Step, logits: jax.Array, sampling: SamplingBatch, flags: SamplerFlags) -> None:
        num_slots = logits.shape[0]
        if flags.bad_words:  # a row's last output may be the previous step's, not yet on the host
            sampling = dataclasses.replace(sampling, prev_tokens=self._prev_tokens)
        step.tokens, step.logprobs = self.compiler.sampler(num_slots, flags)(logits, sampling)
        self._prev_tokens = step.tokens  # the next step's decode inputs, without a host round trip
        for x in (step.tokens, step.logprobs):
            if x is not None:
                jax.tree.map(lambda a: a.copy_to_host_async(), x)

    def _finish(self, step: _Step | None) -> ModelRunnerOutput:
        if step is None:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        assert step.pending is None, "result() before sample() on a step with constrained requests"
        arrays = step.arrays
        tokens = np.asarray(step.tokens)
        rows = [i for i, s in enumerate(arrays.samples) if s]
        req_ids = [arrays.req_ids[i] for i in rows]
        self.input_batch.receive(req_ids, rows, tokens)
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if step.logprobs is not None:
            sampled = _HostLogprobs(step.logprobs)
            for j, i in enumerate(rows):
                state = self.input_batch.requests.get(arrays.req_ids[i])
                params = state.sampling_params if state is not None else None
                if params is not None and params.logprob_token_ids:
                    logprobs[j] = sampled.of_token_ids(i, params.logprob_token_ids)
                elif params is not None and params.logprobs is not None:
                    logprobs[j] = sampled.top(i, params.logprobs)
        prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
        if step.prompt_logprobs is not None:
            prompt = _HostLogprobs(step.prompt_logprobs)
            for req_id, (lo, hi) in arrays.prompt_logprob_rows.items():
                state = self.input_batch.requests.get(req_id)
                if state is not None:
                    prompt_logprobs[req_id] = [prompt.top(t, state.sampling_params.prompt_logprobs)
                                               for t in range(lo, hi)]
        return ModelRunnerOutput(
            req_ids=req_ids,
            sampled_token_ids=[int(tokens[i]) for i in rows],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def start_background_work(self) -> None:
        self.compiler.load_in_background()

    def shutdown(self) -> None:
        self.compiler.shutdown()

    def compile_state(self) -> CompileState:
        return self.compiler.state()


def _forward_inputs(arrays: StepArrays, logits_indices: np.ndarray) -> ForwardInputs:
    return ForwardInputs(
        input_ids=arrays.input_ids, positions=arrays.positions, slot_mapping=arrays.slot_mapping,
        cu_q_lens=arrays.cu_q_lens, kv_lens=arrays.kv_lens, page_indices=arrays.page_indices,
        num_seqs=arrays.num_seqs, logits_indices=logits_indices, placeholder_rows=arrays.placeholder_rows,
    )


@partial(jax.jit, static_argnames=("width",))
def _prompt_logprobs(logits: jax.Array, targets: jax.Array, width: int) -> LogprobOutputs:
    """logits [T, V] f32, targets [T] (token p + 1 for position p) -> the targets' logprobs and ranks, and the
    top `width`."""
    return logprob_outputs(logits, targets, width)


class _HostLogprobs:
    """A step's `LogprobOutputs` on the host, read row by row into `TokenLogprobs`."""

    def __init__(self, device: LogprobOutputs):
        self.chosen, self.rank, self.top_ids, self.top_values = (
            np.asarray(x) for x in (device.chosen, device.rank, device.top_ids, device.top_values))
        self.token_id_values = None if device.token_id_values is None else np.asarray(device.token_id_values)

    def top(self, i: int, count: int) -> TokenLogprobs:
        """Row i with its top `count` (-1: the whole width, the vocabulary's with a full-vocabulary request)."""
        k = self.top_ids.shape[1] if count == -1 else min(count, self.top_ids.shape[1])
        return TokenLogprobs(self.top_ids[i, :k].tolist(), self.top_values[i, :k].tolist(), float(self.chosen[i]),
                             int(self.rank[i]))

    def of_token_ids(self, i: int, token_ids: list[int]) -> TokenLogprobs:
        """Row i with the logprobs of the request's `logprob_token_ids`, in their order."""
        values = self.token_id_values[i, : len(token_ids)].tolist()
        return TokenLogprobs(list(token_ids), values, float(self.chosen[i]), int(self.rank[i]))
