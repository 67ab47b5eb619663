"""The engine core's one loop: multi-process replay (an `AsyncEngine` publishing its iterations, a follower
replaying them step for step, grammar decisions included), divergence and death, and grammar compiles that
never hold up the other requests."""

from __future__ import annotations

import asyncio
import pickle
import queue
import threading
import time
from types import SimpleNamespace

import pytest

from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.core import (
    AddRequest,
    CommandQueue,
    EngineCore,
    EngineInfo,
    GrammarReady,
    Iteration,
    Shutdown,
    follow,
)
from jaxllm.engine.interfaces import SchedulerOutput
from jaxllm.sampling_params import SamplingParams, StructuredOutputsParams
from tests.engine.conftest import VOCAB_SIZE
from tests.engine.fake_runner import FakeModelRunner
from tests.engine.test_scheduler import EvenTokensGrammar

EVEN = StructuredOutputsParams(regex="even tokens")  # the tests' compilers ignore the spec


class RecordingRunner(FakeModelRunner):
    """A FakeModelRunner that keeps a printout of every SchedulerOutput and the tokens it sampled."""

    def __init__(self, delay_s: float = 0.001) -> None:
        super().__init__(VOCAB_SIZE, 4, delay_s=delay_s)
        self.steps: list[str] = []

    def execute(self, scheduler_output: SchedulerOutput):
        handle = super().execute(scheduler_output)
        # NOTE: printed at once: page lists are the block manager's and change later.
        self.steps.append(repr(scheduler_output) + repr(handle.output and handle.output.sampled_token_ids))
        return handle


def even_tokens_compiler(delay_s: float = 0.0, gate: threading.Event | None = None):
    """A grammar compiler that takes `delay_s` (or waits for `gate`) and allows even token ids only."""

    def compile_grammar(params: SamplingParams) -> SimpleNamespace:
        if gate is not None:
            assert gate.wait(10)
        time.sleep(delay_s)
        return SimpleNamespace(new_matcher=EvenTokensGrammar)

    return compile_grammar


def test_a_follower_replays_the_leaders_steps_and_grammar_decisions(make_engine, tokenizer) -> None:
    # The follower's compile takes longer than the leader's: it must still schedule the constrained
    # request in the step process 0 chose.
    leader_runner, follower_runner = RecordingRunner(), RecordingRunner()
    leader = make_engine(leader_runner, max_num_batched_tokens=16, grammar_compiler=even_tokens_compiler(0.01))
    follower = make_engine(follower_runner, max_num_batched_tokens=16, grammar_compiler=even_tokens_compiler(0.2))
    messages: queue.Queue[Iteration] = queue.Queue()
    sent: list[Iteration] = []

    def publish(message: Iteration) -> None:
        sent.append(message)
        messages.put(pickle.loads(pickle.dumps(message)))  # as the processes exchange them: no shared objects

    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(steps=follow(follower, messages.get)))
    thread.start()
    server = AsyncEngine(leader, publish)
    server.start()
    prompts = [tokenizer.encode(t) for t in ("Once upon a time", "The cat sat on the mat and", "Tom had a red ball")]

    async def collect(request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
        return [t async for out in server.generate(prompt, params, request_id) for t in out.outputs[0].token_ids]

    async def cancelled() -> None:  # the consumer leaves after the first delta: an abort reaches the engine
        stream = server.generate(prompts[0], SamplingParams(max_tokens=50, ignore_eos=True), "gone")
        await anext(stream)
        await stream.aclose()

    async def aborted() -> tuple[int, str | None]:  # aborted by the server after its first delta
        stream = server.generate(prompts[1], SamplingParams(max_tokens=100, ignore_eos=True), "aborted")
        deltas = [await anext(stream)]
        await server.abort("aborted")
        deltas += [out async for out in stream]
        return sum(len(d.outputs[0].token_ids) for d in deltas), deltas[-1].outputs[0].finish_reason

    async def main() -> list:
        outputs = await asyncio.gather(
            collect("greedy", prompts[0], SamplingParams(temperature=0.0, max_tokens=12)),
            collect("unseeded", prompts[1], SamplingParams(temperature=0.8, max_tokens=12)),
            collect("n2", prompts[2], SamplingParams(n=2, temperature=1.0, max_tokens=6)),
            collect("even", prompts[2], SamplingParams(max_tokens=6, ignore_eos=True, structured_outputs=EVEN)),
            cancelled(),
            aborted(),
        )
        await server.wait_idle()
        return outputs

    try:
        outputs = asyncio.run(main())
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive(), "the follower did not stop with the server"
    assert sent[-1].commands == [Shutdown(failed=False)]
    commands = [c for m in sent[:-1] for c in m.commands]
    assert sum(isinstance(c, AddRequest) for c in commands) == 6
    assert [c.error for c in commands if isinstance(c, GrammarReady)] == [None]
    assert outputs[0] and outputs[1] and outputs[2]
    assert len(outputs[3]) == 6 and all(t % 2 == 0 for t in outputs[3])
    num_aborted, reason = outputs[-1]
    assert num_aborted < 100 and reason == "abort"
    assert result["steps"] == len(leader_runner.steps) > 0
    assert follower_runner.steps == leader_runner.steps
    assert not follower.has_unfinished_requests()


def test_a_follower_that_would_step_otherwise_has_diverged(make_engine) -> None:
    follower = make_engine()
    script = iter([Iteration([], step=True)])  # process 0 stepped; this engine has nothing to step
    with pytest.raises(RuntimeError, match="diverged"):
        follow(follower, lambda: next(script))


def test_a_follower_fails_when_process_0s_engine_died(make_engine) -> None:
    script = iter([Iteration([Shutdown(failed=True)], step=False)])
    with pytest.raises(RuntimeError, match="process 0's engine died"):
        follow(make_engine(), lambda: next(script))


def test_a_compiling_grammar_holds_back_only_its_own_request(make_engine) -> None:
    gate = threading.Event()
    engine = make_engine(grammar_compiler=even_tokens_compiler(gate=gate))
    info = EngineInfo.describe(engine)
    commands = CommandQueue()
    commands.put(info.new_request("even", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True,
                                                                     structured_outputs=EVEN)),
                 info.new_request("free", [5, 6, 8], SamplingParams(max_tokens=4, ignore_eos=True)))
    finished: list[str] = []
    outputs = {}

    def sink(step):
        for out in step:
            outputs[out.request_id] = out
            if out.finished:
                finished.append(out.request_id)
                if out.request_id == "free":
                    gate.set()  # the free request ran to its end while the grammar was still compiling

    core = EngineCore(engine)
    core.run(commands, sink, until_idle=True)
    assert finished == ["free", "even"]
    assert all(t % 2 == 0 for t in outputs["even"].sequences[0].token_ids)
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages


def test_an_abort_while_the_grammar_compiles_frees_the_request(make_engine) -> None:
    gate = threading.Event()
    engine = make_engine(grammar_compiler=even_tokens_compiler(gate=gate))
    info = EngineInfo.describe(engine)
    with_grammar = SamplingParams(max_tokens=4, structured_outputs=EVEN)
    commands = CommandQueue()
    outputs = []
    core = EngineCore(engine)
    thread = threading.Thread(target=core.run, args=(commands, outputs.extend))
    thread.start()
    commands.put(info.new_request("even", [5, 6, 7], with_grammar))
    while not core.engine.is_waiting_for_grammar("even"):
        time.sleep(0.001)
    from jaxllm.engine.core import Abort

    commands.put(Abort(("even",)))
    while not outputs:
        time.sleep(0.001)
    gate.set()
    commands.put(Shutdown())
    thread.join(10)
    core.close()
    assert outputs[0].finished and outputs[0].sequences[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()


def test_a_slow_schema_does_not_delay_other_streams_tokens(make_engine, tokenizer) -> None:
    """A grammar compile of 2 s runs beside a stream on the in-thread engine: that stream's gaps stay
    under 200 ms (the compile is off the loop), and the constrained request follows once compiled."""
    engine = make_engine(FakeModelRunner(VOCAB_SIZE, 4, delay_s=0.005), max_model_len=512, num_pages=256,
                         grammar_compiler=even_tokens_compiler(delay_s=2.0))
    server = AsyncEngine(engine)
    server.start()

    async def stream_gaps(params: SamplingParams, request_id: str, start: asyncio.Event | None = None):
        times, tokens = [time.monotonic()], []
        async for out in server.generate([5, 6, 7], params, request_id):
            times.append(time.monotonic())
            tokens += out.outputs[0].token_ids
            if start is not None and not start.is_set():
                start.set()
        return [b - a for a, b in zip(times, times[1:], strict=False)], tokens, times[-1]

    async def main():
        started = asyncio.Event()
        free = asyncio.create_task(stream_gaps(SamplingParams(max_tokens=400, ignore_eos=True), "free", started))
        await started.wait()
        t0 = time.monotonic()
        gaps_c, tokens_c, end_c = await stream_gaps(
            SamplingParams(max_tokens=4, ignore_eos=True, structured_outputs=EVEN), "even")
        gaps_f, tokens_f, end_f = await free
        return t0, gaps_c, tokens_c, end_c, gaps_f, tokens_f, end_f

    try:
        t0, gaps_c, tokens_c, end_c, gaps_f, tokens_f, end_f = asyncio.run(main())
    finally:
        server.shutdown()
    assert end_c - t0 >= 2.0 and len(tokens_c) == 4 and all(t % 2 == 0 for t in tokens_c)
    assert end_f - t0 > 2.0, "the free stream ended before the compile did: the test proves nothing"
    assert len(tokens_f) == 400 and max(gaps_f[1:]) < 0.2, max(gaps_f[1:])
