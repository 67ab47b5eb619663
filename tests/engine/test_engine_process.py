"""ProcessEngine: the engine loop in a spawned child (over the fake runner here), streamed to asyncio."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from types import SimpleNamespace

import pytest

from jaxllm.engine.client import EngineDeadError
from jaxllm.engine.engine_process import ProcessEngine
from jaxllm.generation_config import GenerationDefaults
from jaxllm.outputs import EngineOutput, Logprob, SequenceOutput
from jaxllm.sampling_params import SamplingParams
from jaxllm.validation import ValidationError
from tests.engine.conftest import EOS_ID, STORIES, VOCAB_SIZE, add, new_llm_engine, run_to_completion
from tests.engine.fake_runner import FakeModelRunner
from tests.engine.test_async_engine import collect, requests

BLOCK_SIZE = 4


def fake_engine_parts(delay_s: float = 0.001, fail_at_step: int | None = None, raise_in_factory: bool = False):
    """The factory run in the child (so: top level, picklable by reference)."""
    from transformers import AutoTokenizer

    if raise_in_factory:
        raise ValueError("no such model: boom")
    runner = FakeModelRunner(VOCAB_SIZE, BLOCK_SIZE, delay_s=delay_s, fail_at_step=fail_at_step)
    engine = new_llm_engine(AutoTokenizer.from_pretrained(STORIES), runner, max_model_len=256, async_scheduling=True,
                            max_num_batched_tokens=16)
    return SimpleNamespace(engine=engine, generation_defaults=GenerationDefaults({"temperature": 0.5}),
                           chat_template="{{ x }}", model_type="llama")


@pytest.fixture(scope="module")
def process_engine():
    engine = ProcessEngine(fake_engine_parts)
    yield engine
    engine.shutdown()
    assert not engine._process.is_alive()


def test_streams_match_the_offline_outputs_and_every_page_comes_back(process_engine, make_engine, tokenizer):
    offline = make_engine(max_model_len=256)
    for request_id, prompt, params in requests(tokenizer):
        add(offline, request_id, prompt, params)
    expected = {rid: out.outputs[0] for rid, out in run_to_completion(offline).items()}
    engine = process_engine
    info = engine.info
    assert (info.max_model_len, info.vocab_size, info.eos_token_ids) == (256, VOCAB_SIZE, frozenset([EOS_ID]))
    assert info.tokenizer.encode("Once upon a time") == tokenizer.encode("Once upon a time")
    assert info.default_sampling == {"temperature": 0.5} and info.chat_template == "{{ x }}"
    assert info.model_type == "llama"

    async def main():
        results = await asyncio.gather(*(collect(engine, *r) for r in requests(tokenizer)))
        await engine.wait_idle()
        return results

    for (request_id, prompt, _), deltas in zip(requests(tokenizer), asyncio.run(main()), strict=True):
        want = expected[request_id]
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert "".join(d.outputs[0].text for d in deltas) == want.text
        assert [t for d in deltas for t in d.outputs[0].token_ids] == want.token_ids
        assert deltas[-1].outputs[0].finish_reason == want.finish_reason
        assert all(d.prompt_token_ids == prompt for d in deltas)
    assert engine.num_free_pages() == engine.info.limits.num_pages
    metrics = engine.metrics()
    assert metrics.generation_tokens_total >= sum(len(w.token_ids) for w in expected.values())
    assert metrics.num_requests_running == 0 and sum(metrics.request_success_total.values()) >= len(expected)


def test_leaving_a_stream_aborts_it_and_refusals_raise_at_once(process_engine, tokenizer):
    engine = process_engine

    async def main():
        stream = engine.generate(tokenizer.encode("Once upon a time"), SamplingParams(max_tokens=200,
                                                                                   ignore_eos=True), "leaver")
        outputs = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        assert len(engine._streams) == 0  # closed at once: the id can be used again right away
        again = engine.generate([5, 6], SamplingParams(max_tokens=2, ignore_eos=True), "leaver")
        assert len([o async for o in again]) >= 1
        with pytest.raises(ValidationError, match="prompt cannot be empty"):
            engine.generate([], SamplingParams(), "empty")
        with pytest.raises(ValidationError, match="maximum context length"):
            engine.generate([5] * 200, SamplingParams(max_tokens=100), "long")
        aborted = []
        async for output in engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), "to-abort"):
            aborted.append(output)
            await engine.abort("to-abort")
        await engine.wait_idle()
        return outputs, aborted

    outputs, aborted = asyncio.run(main())
    assert not outputs[-1].finished
    assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
    assert engine.num_free_pages() == engine.info.limits.num_pages


def test_a_failing_engine_loop_fails_every_stream_and_new_requests(tokenizer):
    engine = ProcessEngine(functools.partial(fake_engine_parts, delay_s=0.002, fail_at_step=4))
    try:
        async def main():
            params = SamplingParams(max_tokens=50, ignore_eos=True)
            results = await asyncio.gather(*(collect(engine, r, p, params) for r, p, _ in requests(tokenizer)),
                                           return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert "InjectedFailure" in str(results[0].__cause__)
            assert engine.is_dead
            with pytest.raises(EngineDeadError):
                engine.generate([5, 6], params, "late")

        asyncio.run(main())
    finally:
        engine.shutdown()


def test_a_killed_engine_process_fails_its_streams():
    engine = ProcessEngine(functools.partial(fake_engine_parts, delay_s=0.01))
    try:
        async def main():
            stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), "r")
            await stream.__anext__()
            os.kill(engine._process.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="exited"):
                async for _ in stream:
                    pass

        asyncio.run(main())
        assert engine.is_dead and "exit code -9" in str(engine.dead_error)
    finally:
        engine.shutdown()


def test_a_command_that_cannot_cross_the_pipe_kills_the_engine_instead_of_stalling_it():
    engine = ProcessEngine(fake_engine_parts)
    try:
        async def main():
            # as if a field could not be pickled
            stream = engine.generate([5, 6], SamplingParams(max_tokens=4), "r", prompt=lambda: None)
            with pytest.raises(EngineDeadError):
                await stream.__anext__()

        asyncio.run(asyncio.wait_for(main(), 30))
        assert engine.is_dead and "could not send" in str(engine.dead_error)
    finally:
        engine.shutdown()


def test_a_factory_that_raises_fails_the_constructor_with_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)could not be built.*no such model: boom"):
        ProcessEngine(functools.partial(fake_engine_parts, raise_in_factory=True))


def test_outputs_cross_the_pipe_as_tuples_without_their_prompt():
    output = EngineOutput("r#3", [SequenceOutput(0, "a", [5], -1.0, [{5: Logprob(-1.0, 1, "a")}], "stop", "a")],
                          finished=True, prompt_logprobs=[None, {2: Logprob(-0.5)}], num_cached_tokens=2,
                          metrics={"e2e_latency": 1.0})
    assert isinstance(output, tuple) and all(isinstance(s, tuple) for s in output.sequences)
    request = output.to_request_output("r", "hi", [1, 2, 3])
    assert (request.request_id, request.prompt, request.prompt_token_ids) == ("r", "hi", [1, 2, 3])
    assert request.outputs[0].text == "a" and request.outputs[0].stop_reason == "a"
    assert request.metrics == {"e2e_latency": 1.0} and request.error is None
