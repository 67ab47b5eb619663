"""A fan-out (a big `n`, a prompt list) enters the scheduler in turn with other requests: a request that comes
later gets its first token within one wave of the fan-out's steps (not after all of it), adding it costs the
loop nothing per child, and the waiting gauge counts every sequence still queued.

Issue 21's repro: `n=10000, max_tokens=16` made a concurrent one-token request wait 227 s (here, on the fake
runner, 10000 steps with 16 seats before and 16 after)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from jaxllm.engine.admission import Admission
from jaxllm.engine.core import AddRequest, EngineInfo
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from tests.engine.conftest import VOCAB_SIZE
from tests.engine.fake_runner import FakeModelRunner
from tests.engine.test_async_engine import started

SEATS = 8  # max_num_seqs
WAVE_STEPS = 6  # the fan-out's max_tokens: one wave of it lasts this many steps


def fan_out_params(n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=WAVE_STEPS, temperature=1.0, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


def small_params() -> SamplingParams:
    return SamplingParams(max_tokens=1, output_kind=RequestOutputKind.DELTA)


def new_request(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams) -> AddRequest:
    return EngineInfo.describe(engine).new_request(request_id, prompt, params)


def steps_until_first_output(engine: LLMEngine, request_id: str, max_steps: int = 100_000) -> int:
    for steps in range(1, max_steps + 1):
        if any(out.request_id == request_id for out in engine.step()):
            return steps
    raise AssertionError(f"{request_id} got no output in {max_steps} steps")


def run_out(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def test_a_later_request_waits_one_wave_of_a_big_n_not_all_of_it(make_engine) -> None:
    engine = make_engine(max_num_seqs=SEATS, num_pages=256)
    n = 2000
    started = time.perf_counter()
    engine.add_request(new_request(engine, "big", [5, 6, 7], fan_out_params(n)))
    assert not engine.scheduler.requests, "a fan-out's children are made as they are let in, not when it is added"
    assert engine.metrics.num_requests_waiting == 0  # gauges move at the step
    engine.step()
    assert len(engine.scheduler.requests) == SEATS
    assert (engine.metrics.num_requests_running, engine.metrics.num_requests_waiting) == (SEATS, n - SEATS)
    assert time.perf_counter() - started < 1.0, "adding n=2000 and one step of it took 1 s (~2 ms measured)"

    engine.add_request(new_request(engine, "small", [8, 9], small_params()))
    assert engine.metrics.num_requests_waiting == n - SEATS  # (its step has not run yet)
    # One wave is WAVE_STEPS steps; all of the fan-out ahead of it, before, was n / SEATS waves.
    assert steps_until_first_output(engine, "small") <= WAVE_STEPS + 2
    engine.abort_request("big")
    run_out(engine)


def test_a_prompt_list_takes_one_turn_among_requests_not_one_each(make_engine) -> None:
    engine = make_engine(max_num_seqs=SEATS, num_pages=256)
    prompts = [AddRequest(f"list-{i}", [5, 6, i + 10], fan_out_params(), WAVE_STEPS, source="list")
               for i in range(60)]
    for command in prompts:
        engine.add_request(command)
    engine.step()
    engine.add_request(new_request(engine, "small", [8, 9], small_params()))
    assert steps_until_first_output(engine, "small") <= WAVE_STEPS + 2
    run_out(engine)


def test_two_fan_outs_and_a_request_take_turns_for_each_free_seat() -> None:
    admission: Admission[str] = Admission()
    admission.add("a", "a", 3)
    admission.add("b", "b", 2)
    admission.add("c", "c", 1)
    admission.add("a", "a2", 1)  # a second prompt of source a: after a's own, in a's turns
    assert admission.num_pending == 7
    taken = [admission.take() for _ in range(7)]
    assert taken == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("a", 2), ("a2", 0)]
    assert admission.take() is None and admission.num_pending == 0


def test_an_abort_reports_every_child_and_frees_the_queue(make_engine) -> None:
    engine = make_engine(max_num_seqs=SEATS, num_pages=256)
    n = 50
    engine.add_request(new_request(engine, "big", [5, 6, 7], fan_out_params(n)))
    engine.step()
    engine.abort_request("big")
    (final,) = engine.step()
    assert final.finished and sorted(seq.index for seq in final.sequences) == list(range(n))
    assert {seq.finish_reason for seq in final.sequences} == {"abort"}
    assert engine.metrics.num_requests_waiting == 0 and not engine.needs_step()


def test_the_children_sample_as_when_they_all_entered_at_once(make_engine) -> None:
    """Seeded children keep seed + index, whenever each is let in: the same tokens with 2 seats as with 16."""
    results = []
    for seats in (2, 16):
        engine = make_engine(max_num_seqs=seats, num_pages=256)
        params = dataclasses.replace(fan_out_params(12), seed=7, output_kind=RequestOutputKind.FINAL_ONLY)
        engine.add_request(new_request(engine, "big", [5, 6, 7], params))
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        results.append([(seq.index, seq.token_ids) for seq in outputs[0].sequences])
    assert results[0] == results[1]


def test_a_served_prompt_list_shares_one_turn(make_engine) -> None:
    """Through the client: `submit_all` sends a prompt list under one source, so a request sent after the list's
    first step starts before most of the list (first come first served, it started after all 60)."""
    runner = FakeModelRunner(VOCAB_SIZE, 4, delay_s=0.02)
    engine = make_engine(runner, max_num_seqs=SEATS, num_pages=256)
    with started(engine) as client:
        async def main() -> None:
            commands = [client.prepare([5, 6, i + 10], fan_out_params(), f"p{i}") for i in range(60)]
            streams = client.submit_all(commands, [f"p{i}" for i in range(60)])
            while runner.num_steps == 0:
                await asyncio.sleep(0.001)
            async for _ in client.generate([8, 9], small_params(), "small"):
                break
            for stream in streams:
                await stream.aclose()
            await client.wait_idle()

        asyncio.run(main())
    started_order = [new.req_id for out in runner.history for new in out.new_requests]
    small_at = next(i for i, req_id in enumerate(started_order) if req_id.startswith("small"))
    assert small_at <= 2 * SEATS, f"{small_at} of the list's prompts started before the later request"
