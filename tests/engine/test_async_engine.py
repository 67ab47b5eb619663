"""AsyncEngine: concurrent streams from asyncio, cancellation frees pages, a dead runner fails every stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest

from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.client import EngineDeadError, RequestFailedError
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput, merge_delta
from jaxllm.sampling_params import SamplingParams, StructuredOutputsParams
from jaxllm.validation import ValidationError
from tests.engine.conftest import VOCAB_SIZE, add, new_llm_engine, run_to_completion
from tests.engine.fake_runner import FakeModelRunner, InjectedFailure
from tests.engine.test_llm_engine import SENTENCES

TIMEOUT_S = 10.0


@contextlib.contextmanager
def started(engine: LLMEngine) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine(engine)
    async_engine.start()
    try:
        yield async_engine
    finally:
        async_engine.shutdown()


async def collect(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams):
    deltas = [out async for out in engine.generate(prompt, params, request_id)]
    return deltas


async def wait_for(condition, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def requests(tokenizer) -> list[tuple[str, list[int], SamplingParams]]:
    return [(f"r{i}", tokenizer.encode(s), SamplingParams(temperature=0.7, seed=i, max_tokens=8 + i, stop=["e"]))
            for i, s in enumerate(SENTENCES)]


def test_concurrent_streams_concatenate_to_the_offline_outputs(make_engine, tokenizer):
    offline = make_engine()
    for request_id, prompt, params in requests(tokenizer):
        add(offline, request_id, prompt, params)
    expected = {rid: out.outputs[0] for rid, out in run_to_completion(offline).items()}

    engine = make_engine(FakeModelRunner(VOCAB_SIZE, 4, delay_s=0.001), async_scheduling=True,
                         max_num_batched_tokens=16)
    with started(engine) as async_engine:
        info = async_engine.info
        assert (info.max_model_len, info.vocab_size, info.eos_token_ids) == (128, VOCAB_SIZE, {2})
        assert info.tokenizer is tokenizer and info.config is engine.config and info.limits is engine.limits

        async def main():
            results = await asyncio.gather(*(collect(async_engine, *r) for r in requests(tokenizer)))
            await async_engine.wait_idle()
            return results

        results = asyncio.run(main())
        for (request_id, _, _), deltas in zip(requests(tokenizer), results, strict=True):
            assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
            want = expected[request_id]
            assert "".join(d.outputs[0].text for d in deltas) == want.text
            assert [t for d in deltas for t in d.outputs[0].token_ids] == want.token_ids
            assert deltas[-1].outputs[0].finish_reason == want.finish_reason
        assert async_engine.num_free_pages() == info.limits.num_pages
        assert async_engine.metrics().generation_tokens_total == sum(len(w.token_ids) for w in expected.values())


def test_a_slow_consumer_gets_the_steps_it_missed_merged_into_one_output(make_engine, tokenizer):
    prompt = tokenizer.encode(SENTENCES[0])
    params = SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2)
    offline = make_engine()
    add(offline, "r", prompt, params)
    want = run_to_completion(offline)["r"].outputs[0]

    engine = make_engine(FakeModelRunner(VOCAB_SIZE, 4, delay_s=0.001), max_model_len=256)
    with started(engine) as async_engine:

        async def slow_reader():
            deltas = []
            async for out in async_engine.generate(prompt, params, "r"):
                deltas.append(out)
                time.sleep(0.01)  # blocks the event loop: about ten engine steps land meanwhile
            return deltas

        deltas = asyncio.run(slow_reader())
    assert len(deltas) < len(want.token_ids) / 2, "the missed steps were not merged"
    assert any(len(d.outputs[0].token_ids) > 1 for d in deltas)
    assert "".join(d.outputs[0].text for d in deltas) == want.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == want.token_ids
    merged_logprobs = [p for d in deltas for p in d.outputs[0].logprobs]
    assert [max(p, key=lambda t: p[t].logprob) for p in merged_logprobs] == want.token_ids
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_consumer_going_away_aborts_and_frees_pages(make_engine, tokenizer, how):
    engine = make_engine(FakeModelRunner(VOCAB_SIZE, 4, delay_s=0.002), max_model_len=256)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    with started(engine) as async_engine:
        async def main():
            received = 0
            if how == "aclose":
                stream = async_engine.generate(tokenizer.encode(SENTENCES[0]), params, "gone")
                async for _ in stream:
                    received += 1
                    if received == 3:
                        break
                await stream.aclose()
                # closed at once (not by a later finalizer): the id is free again before any other await
                assert len(async_engine._streams) == 0
            else:
                first_outputs = asyncio.Event()

                async def consume():
                    nonlocal received
                    async for _ in async_engine.generate(tokenizer.encode(SENTENCES[0]), params, "gone"):
                        received += 1
                        if received == 3:
                            first_outputs.set()

                task = asyncio.create_task(consume())
                await asyncio.wait_for(first_outputs.wait(), TIMEOUT_S)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            await wait_for(lambda: async_engine.num_free_pages() == async_engine.info.limits.num_pages)
            await async_engine.wait_idle()
            return received

        assert asyncio.run(main()) >= 3
        metrics = async_engine.metrics()
        assert metrics.request_success_total == {"abort": 1}
        assert metrics.generation_tokens_total < 200


def test_abort_ends_the_stream_with_abort(make_engine, tokenizer):
    engine = make_engine(FakeModelRunner(VOCAB_SIZE, 4, delay_s=0.002), max_model_len=256)
    with started(engine) as async_engine:
        async def main():
            outputs = []
            async for out in async_engine.generate(tokenizer.encode(SENTENCES[1]),
                                                   SamplingParams(max_tokens=200, ignore_eos=True), "x"):
                outputs.append(out)
                if len(outputs) == 2:
                    await async_engine.abort("x")
            await async_engine.wait_idle()
            return outputs

        outputs = asyncio.run(main())
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
        assert len(outputs) < 50


def test_invalid_requests_raise_at_once_and_a_failed_grammar_fails_its_stream(make_engine, tokenizer):
    def broken_compiler(params):
        raise ValueError("unsupported regex: boom")

    engine = make_engine(grammar_compiler=broken_compiler)
    with started(engine) as async_engine:
        async def main():
            with pytest.raises(ValidationError, match="prompt cannot be empty"):
                async_engine.generate([], SamplingParams(), "empty")  # nothing is sent
            with pytest.raises(ValidationError, match="maximum context length"):
                async_engine.generate([5] * 100, SamplingParams(max_tokens=100), "long")
            spec = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"))
            stream = async_engine.generate([5, 6], spec, "grammar")
            with pytest.raises(RequestFailedError, match="boom"):  # compiled in the engine, delivered to the stream
                await stream.__anext__()
            await async_engine.wait_idle()
            assert async_engine.num_free_pages() == async_engine.info.limits.num_pages

        asyncio.run(main())


def test_a_stream_closed_before_it_was_read_aborts_its_request(make_engine, tokenizer):
    engine = make_engine(FakeModelRunner(VOCAB_SIZE, 4, delay_s=0.002), max_model_len=256)
    with started(engine) as async_engine:
        async def main():
            stream = async_engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), "unread")
            await stream.aclose()
            await async_engine.wait_idle()

        asyncio.run(main())
        assert async_engine.metrics().request_success_total == {"abort": 1}


def test_idle_engine_thread_does_not_step(make_engine):
    engine = make_engine()
    steps = 0
    original_step = engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return original_step()

    engine.step = counting_step
    with started(engine) as async_engine:
        async def main():
            await collect(async_engine, "a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
            await async_engine.wait_idle()
            before = steps
            await asyncio.sleep(0.1)
            assert steps == before
            await collect(async_engine, "b", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))

        asyncio.run(main())


def test_runner_failure_fails_every_stream_and_kills_the_engine(tokenizer):
    runner = FakeModelRunner(VOCAB_SIZE, 4, delay_s=0.002, fail_at_step=4)
    engine = new_llm_engine(tokenizer, runner, max_num_batched_tokens=8)
    with started(engine) as async_engine:
        async def main():
            params = SamplingParams(max_tokens=50, ignore_eos=True)
            results = await asyncio.gather(*(collect(async_engine, f"r{i}", tokenizer.encode(s), params)
                                             for i, s in enumerate(SENTENCES)), return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert all(isinstance(r.__cause__, InjectedFailure) for r in results)
            assert async_engine.is_dead and isinstance(async_engine.dead_error, InjectedFailure)
            with pytest.raises(EngineDeadError):
                async_engine.generate([5, 6], params, "late")

        asyncio.run(main())


def test_merge_delta_joins_each_sequence_and_keeps_the_first_prompt_logprobs():
    first = RequestOutput("r", None, [1, 2], [CompletionOutput(1, "a", [5], -1.0, [{5: Logprob(-1.0)}])],
                          finished=False, prompt_logprobs=[None, {2: Logprob(-0.5)}], num_cached_tokens=0)
    second = RequestOutput("r", None, [1, 2], [
        CompletionOutput(0, "x", [7], -0.1, [{7: Logprob(-0.1)}]),
        CompletionOutput(1, "b", [6], -3.0, [{6: Logprob(-2.0)}], finish_reason="stop", stop_reason="b"),
    ], finished=True, prompt_logprobs=None, num_cached_tokens=16, metrics={"e2e_latency": 1.0})
    merged = merge_delta(first, second)
    assert [c.index for c in merged.outputs] == [0, 1]
    seq0, seq1 = merged.outputs
    assert (seq0.text, seq0.token_ids) == ("x", [7])
    assert (seq1.text, seq1.token_ids, seq1.cumulative_logprob) == ("ab", [5, 6], -3.0)
    assert [list(p) for p in seq1.logprobs] == [[5], [6]]
    assert (seq1.finish_reason, seq1.stop_reason) == ("stop", "b")
    assert merged.prompt_logprobs == [None, {2: Logprob(-0.5)}]
    assert (merged.finished, merged.num_cached_tokens, merged.metrics) == (True, 16, {"e2e_latency": 1.0})
