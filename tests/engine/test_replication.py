"""Multi-process serving without devices: an `AsyncEngine` publishing its engine calls and a follower
`LLMEngine` replaying them (`jaxllm.engine.replication`) schedule exactly the same steps, for
concurrent streams, unseeded sampling (seeds drawn by the engine), n > 1, a cancelled stream and
an abort, and the follower returns when the server's engine stops."""

from __future__ import annotations

import asyncio
import pickle
import queue
import threading

import pytest

from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.fake_runner import FakeModelRunner
from jaxllm.engine.interfaces import SchedulerOutput
from jaxllm.engine.replication import EngineCall, StepMessage, follow
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import VOCAB_SIZE


class RecordingRunner(FakeModelRunner):
    """A FakeModelRunner that keeps a printout of every SchedulerOutput and the tokens it sampled."""

    def __init__(self) -> None:
        super().__init__(VOCAB_SIZE, 4, delay_s=0.001)
        self.steps: list[str] = []

    def execute(self, scheduler_output: SchedulerOutput):
        handle = super().execute(scheduler_output)
        # NOTE: printed at once: page lists are the block manager's and change later.
        self.steps.append(repr(scheduler_output) + repr(handle.output.sampled_token_ids))
        return handle


def test_a_follower_replays_the_servers_engine_steps(make_engine, tokenizer) -> None:
    leader_runner, follower_runner = RecordingRunner(), RecordingRunner()
    leader = make_engine(leader_runner, max_num_batched_tokens=16)
    follower = make_engine(follower_runner, max_num_batched_tokens=16)
    messages: queue.Queue[StepMessage] = queue.Queue()
    sent: list[StepMessage] = []

    def publish(message: StepMessage) -> None:
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
    assert sent[-1].stop and not any(m.stop for m in sent[:-1])
    methods = [c.method for m in sent for c in m.calls]
    assert methods.count("add_request") == 5 and "abort_request" in methods
    assert outputs[0] and outputs[1] and outputs[2]
    num_aborted, reason = outputs[-1]
    assert num_aborted < 100 and reason == "abort"
    assert result["steps"] == len(leader_runner.steps) > 0
    assert follower_runner.steps == leader_runner.steps
    assert not follower.has_unfinished_requests()


def test_a_rejected_call_is_rejected_on_the_follower_too(make_engine, tokenizer) -> None:
    """A call that raised ValueError on process 0 is replayed, raises the same way, and changes nothing."""
    follower = make_engine()
    too_long = EngineCall("add_request", ("big", [5] * 200, SamplingParams(max_tokens=4)), {"delta": True},
                          raised=True)
    ok = EngineCall("add_request", ("ok", tokenizer.encode("Once"), SamplingParams(temperature=0.0, max_tokens=3)))
    script = iter([StepMessage([too_long, ok], step=True), StepMessage([], step=True), StepMessage([], step=True),
                   StepMessage([], step=False, stop=True)])
    assert follow(follower, lambda: next(script)) == 3
    assert not follower.has_unfinished_requests()


def test_a_call_with_another_outcome_than_on_process_0_is_a_divergence(make_engine) -> None:
    follower = make_engine()
    too_long = EngineCall("add_request", ("big", [5] * 200, SamplingParams(max_tokens=4)), {"delta": True})
    script = iter([StepMessage([too_long], step=False)])  # process 0 says it succeeded there
    with pytest.raises(RuntimeError, match="diverged.*add_request raised here only"):
        follow(follower, lambda: next(script))


def test_a_follower_fails_when_process_0s_engine_died(make_engine) -> None:
    script = iter([StepMessage([], step=False, stop=True, failed=True)])
    with pytest.raises(RuntimeError, match="process 0's engine died"):
        follow(make_engine(), lambda: next(script))
