"""Scheduler over a BlockManager and the FakeModelRunner: budget, chunking, FCFS, preemption, placeholders."""

from __future__ import annotations

import numpy as np

from jaxllm.config import EngineLimits
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.interfaces import SchedulerOutput
from jaxllm.engine.request import Request, RequestStatus
from jaxllm.engine.scheduler import Scheduler
from jaxllm.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeModelRunner

VOCAB = 512


def make_scheduler(*, num_pages: int = 16, block_size: int = 4, max_num_seqs: int = 4, budget: int = 16,
                   max_model_len: int = 64) -> Scheduler:
    limits = EngineLimits(max_model_len, block_size, num_pages, max_num_seqs, budget, (budget,), False)
    return Scheduler(limits, BlockManager(num_pages, block_size), VOCAB)


def add(scheduler: Scheduler, req_id: str, num_prompt: int, max_tokens: int = 4, first: int = 10) -> Request:
    request = Request(req_id, list(range(first, first + num_prompt)), SamplingParams(temperature=0.0), max_tokens)
    scheduler.add_request(request)
    return request


def finish_at_max_tokens(scheduler: Scheduler, sampled) -> None:
    for token in sampled:
        if len(token.request.output_token_ids) >= token.request.max_tokens:
            scheduler.finish_request(token.request.req_id, RequestStatus.FINISHED_LENGTH)


def step(scheduler: Scheduler, runner: FakeModelRunner) -> SchedulerOutput:
    """One synchronous step: schedule, run, resolve, finish requests at max_tokens."""
    out = scheduler.schedule()
    if not out.is_empty:
        handle = runner.execute(out)
        if out.structured_req_ids:
            out.grammar_bitmask = scheduler.grammar_bitmask(out)
            handle.sample(out.grammar_bitmask)
        finish_at_max_tokens(scheduler, scheduler.update_from_output(out, handle.result()))
    return out


def run_all(scheduler: Scheduler, runner: FakeModelRunner, max_steps: int = 500) -> list[SchedulerOutput]:
    outputs = []
    while scheduler.has_unfinished_requests():
        outputs.append(step(scheduler, runner))
        assert len(outputs) < max_steps
    return outputs


def test_chunked_prefill_budget_and_diffs():
    scheduler = make_scheduler(budget=8)
    runner = FakeModelRunner(VOCAB, 4)
    a = add(scheduler, "a", 10)
    add(scheduler, "b", 5, first=100)

    out1 = step(scheduler, runner)
    assert out1.num_scheduled_tokens == {"a": 8} and out1.total_num_scheduled_tokens == 8
    assert [(n.req_id, n.page_ids, n.num_computed_tokens) for n in out1.new_requests] == [("a", [0, 1], 0)]
    assert a.output_token_ids == []  # a chunk that does not reach the end does not sample

    out2 = step(scheduler, runner)
    assert out2.num_scheduled_tokens == {"a": 2, "b": 5}  # running first, then waiting, under one budget
    assert [(c.req_id, c.new_page_ids, c.num_computed_tokens) for c in out2.cached_requests] == [("a", [2], 8)]
    assert [(n.req_id, n.page_ids) for n in out2.new_requests] == [("b", [3, 4])]
    assert len(a.output_token_ids) == 1

    out3 = step(scheduler, runner)
    assert out3.num_scheduled_tokens == {"a": 1, "b": 1}
    assert out3.new_requests == []
    assert [(c.req_id, c.new_page_ids, c.num_computed_tokens) for c in out3.cached_requests] == [
        ("a", [], 10), ("b", [], 5)]
    run_all(scheduler, runner)
    assert scheduler.block_manager.num_free_pages == 16


def test_fcfs_and_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2, budget=64)
    runner = FakeModelRunner(VOCAB, 4)
    for name in ("a", "b", "c"):
        add(scheduler, name, 3, max_tokens=2)
    out = step(scheduler, runner)
    assert list(out.num_scheduled_tokens) == ["a", "b"]
    out = step(scheduler, runner)  # a and b finish here (2 tokens each)
    assert list(out.num_scheduled_tokens) == ["a", "b"]
    out = step(scheduler, runner)
    assert list(out.num_scheduled_tokens) == ["c"] and out.finished_req_ids == {"a", "b"}
    run_all(scheduler, runner)


def test_fcfs_head_without_pages_blocks_later_requests():
    scheduler = make_scheduler(num_pages=3, block_size=4, budget=64)
    runner = FakeModelRunner(VOCAB, 4)
    add(scheduler, "a", 8, max_tokens=3)  # holds 2 of the 3 pages
    step(scheduler, runner)
    add(scheduler, "big", 8, first=200)  # needs 2 pages: must wait
    add(scheduler, "small", 2, first=300)  # would fit, but arrived later
    out = step(scheduler, runner)
    assert list(out.num_scheduled_tokens) == ["a"]
    run_all(scheduler, runner)


def test_preempts_newest_running_request_and_resumes_it():
    scheduler = make_scheduler(num_pages=4, block_size=4, budget=64)
    runner = FakeModelRunner(VOCAB, 4)
    a = add(scheduler, "a", 6, max_tokens=8)
    b = add(scheduler, "b", 6, max_tokens=8, first=100)
    outputs = [step(scheduler, runner) for _ in range(3)]  # prefill + 2 decodes: 8 tokens each, pool full
    assert [o.num_scheduled_tokens for o in outputs] == [{"a": 6, "b": 6}, {"a": 1, "b": 1}, {"a": 1, "b": 1}]
    assert a.page_ids == [0, 1] and b.page_ids == [2, 3] and scheduler.block_manager.num_free_pages == 0

    out = step(scheduler, runner)  # a needs a 3rd page: b, the newest, is preempted
    assert out.num_scheduled_tokens == {"a": 1} and out.finished_req_ids == {"b"}
    assert [c.new_page_ids for c in out.cached_requests] == [[3]]  # b's tail page, freed last-in
    assert b.status == RequestStatus.PREEMPTED and b.page_ids == [] and b.num_computed_tokens == 0
    assert list(scheduler.waiting) == [b] and scheduler.running == [a]
    assert scheduler.num_preemptions == 1
    b_outputs_at_preemption = list(b.output_token_ids)

    resumed = []
    for out in run_all(scheduler, runner):
        resumed += [n for n in out.new_requests if n.req_id == "b"]
        assert "b" not in out.finished_req_ids or out.num_scheduled_tokens.get("b") is None
    assert len(resumed) == 1
    assert resumed[0].output_token_ids == b_outputs_at_preemption  # recomputed as prompt + outputs so far
    assert scheduler.block_manager.num_free_pages == 4

    # Same tokens as with a pool big enough for no preemption.
    big = make_scheduler(num_pages=64, block_size=4, budget=64)
    a2, b2 = add(big, "a", 6, max_tokens=8), add(big, "b", 6, max_tokens=8, first=100)
    run_all(big, FakeModelRunner(VOCAB, 4))
    assert big.num_preemptions == 0
    assert (a2.output_token_ids, b2.output_token_ids) == (a.output_token_ids, b.output_token_ids)


def test_newest_request_preempts_itself():
    scheduler = make_scheduler(num_pages=3, block_size=4, budget=64)
    runner = FakeModelRunner(VOCAB, 4)
    a = add(scheduler, "a", 2, max_tokens=2)
    b = add(scheduler, "b", 8, max_tokens=2, first=100)
    step(scheduler, runner)
    out = step(scheduler, runner)  # b's decode needs a 4th page; b is the newest
    assert out.num_scheduled_tokens == {"a": 1} and out.finished_req_ids == {"b"}
    assert scheduler.running == [] and a.is_finished
    assert list(scheduler.waiting) == [b]
    run_all(scheduler, runner)
    assert len(b.output_token_ids) == 2


def test_never_schedules_past_max_model_len():
    scheduler = make_scheduler(max_model_len=12, budget=64)
    runner = FakeModelRunner(VOCAB, 4)
    request = add(scheduler, "a", 8, max_tokens=4)
    outputs = run_all(scheduler, runner)
    assert sum(o.total_num_scheduled_tokens for o in outputs) == 11  # the 12th token is sampled, never fed
    assert len(request.output_token_ids) == 4


def test_async_placeholders_resolve_to_the_sync_tokens():
    sync = make_scheduler()
    sync_request = add(sync, "a", 5, max_tokens=3)
    run_all(sync, FakeModelRunner(VOCAB, 4))

    scheduler = make_scheduler()
    runner = FakeModelRunner(VOCAB, 4)
    request = add(scheduler, "a", 5, max_tokens=3)
    out1 = scheduler.schedule()
    handle1 = runner.execute(out1)
    assert request.num_output_placeholders == 1
    out2 = scheduler.schedule()  # step 1's token is not on the host: decode its placeholder
    assert out2.num_scheduled_tokens == {"a": 1} and out2.cached_requests[0].num_computed_tokens == 5
    assert request.num_output_placeholders == 2 and request.output_token_ids == []
    handle2 = runner.execute(out2)
    scheduler.update_from_output(out1, handle1.result())
    assert request.num_output_placeholders == 1 and len(request.output_token_ids) == 1
    out3 = scheduler.schedule()
    handle3 = runner.execute(out3)
    scheduler.update_from_output(out2, handle2.result())
    assert scheduler.schedule().is_empty  # 3 tokens sampled or in flight: nothing more to do for it
    finish_at_max_tokens(scheduler, scheduler.update_from_output(out3, handle3.result()))
    assert request.output_token_ids == sync_request.output_token_ids
    assert request.is_finished and scheduler.block_manager.num_free_pages == 16


def test_token_of_a_request_finished_while_in_flight_is_dropped():
    scheduler = make_scheduler()
    runner = FakeModelRunner(VOCAB, 4)
    request = add(scheduler, "a", 5, max_tokens=8)
    out1 = scheduler.schedule()
    handle1 = runner.execute(out1)
    out2 = scheduler.schedule()
    handle2 = runner.execute(out2)
    assert len(scheduler.update_from_output(out1, handle1.result())) == 1
    scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)  # e.g. its first token was EOS
    assert scheduler.block_manager.num_free_pages == 16
    assert scheduler.update_from_output(out2, handle2.result()) == []
    assert len(request.output_token_ids) == 1


def test_finished_ids_are_reported_once_and_not_lost_in_empty_steps():
    scheduler = make_scheduler()
    runner = FakeModelRunner(VOCAB, 4)
    add(scheduler, "a", 5)
    step(scheduler, runner)
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.block_manager.num_free_pages == 16  # at once
    assert scheduler.schedule().is_empty
    add(scheduler, "b", 3)
    assert step(scheduler, runner).finished_req_ids == {"a"}
    assert step(scheduler, runner).finished_req_ids == set()
    scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED)


class EvenTokensGrammar:
    """Allows even token ids only; records the calls the engine makes."""

    def __init__(self, vocab_size: int = VOCAB) -> None:
        self.vocab_size = vocab_size
        self.calls: list[str] = []

    def fill_bitmask(self, bitmask: np.ndarray) -> None:
        allowed = np.zeros(bitmask.size * 32, dtype=np.uint8)
        allowed[0:self.vocab_size:2] = 1
        bitmask[:] = np.packbits(allowed, bitorder="little").view(np.int32)
        self.calls.append("fill")

    def accept_token(self, token_id: int) -> bool:
        self.calls.append(f"accept {token_id}")
        return token_id % 2 == 0


def test_bitmask_only_for_constrained_requests_that_sample():
    scheduler = make_scheduler(budget=4)
    runner = FakeModelRunner(VOCAB, 4)
    constrained = Request("g", list(range(10, 16)), SamplingParams(temperature=0.0), 3, grammar=EvenTokensGrammar())
    scheduler.add_request(constrained)
    add(scheduler, "free", 2, max_tokens=3, first=50)
    out = step(scheduler, runner)
    assert out.num_scheduled_tokens == {"g": 4} and out.structured_req_ids == []  # a chunk: no sample
    out = step(scheduler, runner)
    assert out.num_scheduled_tokens == {"g": 2, "free": 2}
    assert out.structured_req_ids == ["g"] and list(out.grammar_bitmask) == ["g"]
    assert out.grammar_bitmask["g"].shape == (VOCAB // 32,)
    assert out.grammar_bitmask["g"].dtype == np.int32
    run_all(scheduler, runner)
    assert all(t % 2 == 0 for t in constrained.output_token_ids)
