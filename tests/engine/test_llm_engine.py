"""LLMEngine end to end over the FakeModelRunner: every scheduling mode gives the same outputs."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from jaxllm.engine import llm_engine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from jaxllm.validation import ValidationError
from tests.engine.conftest import EOS_ID, VOCAB_SIZE, add, run_to_completion, step
from tests.engine.fake_runner import FAKE_LOGPROB_STEP, FakeModelRunner, fake_next_token
from tests.engine.test_scheduler import EvenTokensGrammar

SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "She liked to play outside in the park with her dog.",
    "One day, she saw a big red ball under a tree.",
    "The sun was warm and the birds sang happy songs.",
    "Tom had a toy car that could go very fast.",
]


def workload(tokenizer) -> list[tuple[str, list[int], SamplingParams]]:
    """Requests of varied lengths, shared prefixes, n > 1, seeds and greedy ones."""
    encoded = [tokenizer.encode(s) for s in SENTENCES]
    requests = []
    for i, prompt in enumerate(encoded):
        requests.append((f"solo-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=6 + 2 * i, ignore_eos=True)))
        shared = encoded[0] + prompt[1:]
        requests.append((f"shared-{i}", shared, SamplingParams(temperature=0.8, seed=i, max_tokens=5 + i)))
    requests.append(("fanout", encoded[1], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=9,
                                                           ignore_eos=True)))
    return requests


def summarize(outputs: dict[str, RequestOutput]) -> dict[str, list[tuple]]:
    return {rid: [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs]
            for rid, out in outputs.items()}


def run_workload(make_engine, tokenizer, **config) -> tuple[dict[str, list[tuple]], object]:
    engine = make_engine(**config)
    for request_id, prompt, params in workload(tokenizer):
        add(engine, request_id, prompt, params)
    outputs = run_to_completion(engine)
    assert all(out.finished for out in outputs.values())
    return summarize(outputs), engine


REFERENCE = dict(num_pages=512, max_num_batched_tokens=512, max_num_seqs=64, enable_prefix_caching=False)
VARIANTS = {
    "chunked": dict(max_num_batched_tokens=5, max_num_seqs=3),
    "preempt": dict(num_pages=16),
    "prefix": dict(enable_prefix_caching=True),
    "async": dict(async_scheduling=True),
    "all": dict(num_pages=12, max_num_batched_tokens=7, max_num_seqs=5, async_scheduling=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_scheduling_mode_gives_the_reference_outputs(make_engine, tokenizer, variant):
    reference, _ = run_workload(make_engine, tokenizer, **REFERENCE)
    config = {**REFERENCE, **dict(num_pages=64, max_num_batched_tokens=64, max_num_seqs=8,
                                  enable_prefix_caching=True), **VARIANTS[variant]}
    got, engine = run_workload(make_engine, tokenizer, **config)
    assert got == reference
    metrics = engine.metrics.snapshot()
    if variant in ("preempt", "all"):
        assert metrics.num_preemptions_total > 0
    if variant == "prefix":
        assert metrics.prefix_cache_hits_total > 0
    if variant in ("chunked", "all"):  # some prompt really was split over steps
        assert any(new.num_computed_tokens + out.num_scheduled_tokens[new.req_id] < len(new.prompt_token_ids)
                   for out in engine.runner.history for new in out.new_requests)


def test_fake_runner_rule_by_hand(make_engine):
    assert fake_next_token([5, 6], 0, 512) == (7 * 6 + 2 + 11) % 512 == 55
    engine = make_engine()
    add(engine, "r", [5, 6], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    tokens = run_to_completion(engine)["r"].outputs[0].token_ids
    assert tokens == [55, fake_next_token([5, 6, 55], 0, VOCAB_SIZE)]


def test_n_children_have_distinct_seeds_and_share_the_prompt(make_engine, tokenizer):
    prompt = tokenizer.encode(SENTENCES[0])  # 16 tokens: 3 full blocks of 4 before the last token
    engine = make_engine()
    add(engine, "seeded", prompt, SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=4))
    out = run_to_completion(engine)["seeded"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seeds = {new.req_id: new.sampling_params.seed for step in engine.runner.history for new in step.new_requests}
    assert seeds == {"0_seeded": 7, "1_seeded": 8, "2_seeded": 9}
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    # The two later children reuse the first one's prompt pages.
    assert engine.metrics.snapshot().prefix_cache_hits_total == 2 * 12

    def unseeded_seeds(model_seed: int) -> list[int]:
        engine = make_engine(seed=model_seed)
        add(engine, "r", prompt, SamplingParams(n=3, temperature=1.0, max_tokens=2))
        add(engine, "greedy", prompt, SamplingParams(n=2, temperature=0.0, max_tokens=3))
        outputs = run_to_completion(engine)
        greedy = outputs["greedy"].outputs
        assert greedy[0].token_ids == greedy[1].token_ids
        return [new.sampling_params.seed for step in engine.runner.history for new in step.new_requests
                if new.req_id.endswith("_r")]

    first = unseeded_seeds(0)
    assert len(set(first)) == 3
    assert unseeded_seeds(0) == first  # drawn from a host RNG seeded by config.model.seed
    assert unseeded_seeds(1) != first


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_frees_pages_at_once_and_reports_abort(make_engine, tokenizer, async_scheduling):
    engine = make_engine(async_scheduling=async_scheduling)
    prompt = tokenizer.encode(SENTENCES[1])
    add(engine, "keep", prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    add(engine, "drop", tokenizer.encode(SENTENCES[2]),
                       SamplingParams(n=2, temperature=1.0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        step(engine)
    held = {page for r in engine.scheduler.running if r.req_id.endswith("_drop") for page in r.page_ids}
    assert len(held) >= 7  # the children share their prompt's full blocks, not the rest
    free_before = engine.block_manager.num_free_pages
    engine.abort_request("drop")
    assert engine.block_manager.num_free_pages == free_before + len(held)
    outputs = {o.request_id: o for o in step(engine)}
    assert outputs["drop"].finished and [c.finish_reason for c in outputs["drop"].outputs] == ["abort", "abort"]
    assert {"0_drop", "1_drop"} <= engine.runner.history[-1].finished_req_ids
    final = run_to_completion(engine)
    assert "drop" not in final and len(final["keep"].outputs[0].token_ids) == 20
    assert engine.metrics.snapshot().request_success_total == {"abort": 2, "length": 1}


def test_validation_errors_use_vllms_wording_and_name_the_field(make_engine):
    engine = make_engine(max_model_len=128)
    params = SamplingParams(max_tokens=50)
    with pytest.raises(ValidationError) as e:
        add(engine, "r", [5] * 100, params)
    assert str(e.value) == (
        "This model's maximum context length is 128 tokens. However, you requested 50 output tokens and your "
        "prompt contains at least 100 input tokens, for a total of at least 150 tokens. Please reduce the length "
        "of the input prompt or the number of requested output tokens.")
    assert e.value.param == "max_tokens"
    cases = [
        ([5] * 128, SamplingParams(max_tokens=None), "input_tokens",
         "maximum context length is 128 tokens. However, your request has 128"),
        ([5] * 130, SamplingParams(max_tokens=4), "input_tokens", "you requested 4 output tokens"),
        ([], params, "prompt", "prompt cannot be empty"),
        ([5, 512], params, "prompt", r"Token ids \[512\] are out of vocabulary \(size 512\)"),
        ([5], SamplingParams(stop_token_ids=[9999]), "stop_token_ids", "out of vocabulary"),
        ([5], SamplingParams(logit_bias={600: 1.0}), "logit_bias", "out of vocabulary"),
        ([5], SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")), "structured_outputs",
         "no grammar backend"),
        ([5], SamplingParams(logprobs=21), "logprobs",
         "Requested sample logprobs of 21, which is greater than max allowed: 20"),
        ([5], SamplingParams(prompt_logprobs=50), "prompt_logprobs",
         "Requested prompt logprobs of 50, which is greater than max allowed: 20"),
    ]
    for prompt, case_params, param, message in cases:
        with pytest.raises(ValidationError, match=message) as e:
            add(engine, "r", prompt, case_params)
        assert e.value.param == param
    small = make_engine(num_pages=4, block_size=4)
    with pytest.raises(ValidationError, match="needs 5 KV pages"):
        add(small, "r", [5] * 10, SamplingParams(max_tokens=8))
    with pytest.raises(ValidationError, match="top_p must be in") as e:
        SamplingParams(top_p=0.0)
    assert e.value.param == "top_p"
    add(engine, "r", [5], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already running"):
        add(engine, "r", [5], SamplingParams(max_tokens=1))
    run_to_completion(engine)


def test_max_tokens_none_runs_to_the_context_length(make_engine):
    engine = make_engine(max_model_len=40)
    add(engine, "r", list(range(10, 40)), SamplingParams(max_tokens=None, ignore_eos=True))
    out = run_to_completion(engine)["r"].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_logprobs_and_prompt_logprobs(make_engine, tokenizer):
    engine = make_engine(max_num_batched_tokens=5)  # the prompt arrives in chunks
    prompt = tokenizer.encode(SENTENCES[2])
    add(engine, "r", prompt, SamplingParams(logprobs=2, prompt_logprobs=1, max_tokens=6, ignore_eos=True))
    out = run_to_completion(engine)["r"]
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert next(iter(entry)) == token_id and entry[token_id].rank == 1 and len(entry) == 2
        assert entry[token_id].decoded_token == tokenizer.decode([token_id])
    assert completion.cumulative_logprob == pytest.approx(6 * FAKE_LOGPROB_STEP)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    assert [next(iter(entry)) for entry in out.prompt_logprobs[1:]] == prompt[1:]


def test_no_logprobs_unless_asked(make_engine):
    engine = make_engine()
    add(engine, "r", [5, 6, 7], SamplingParams(max_tokens=3))
    out = run_to_completion(engine)["r"]
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None
    assert out.prompt_logprobs is None


@pytest.mark.parametrize("stream_interval", [1, 3])
def test_delta_outputs_concatenate_to_the_cumulative_ones(make_engine, tokenizer, stream_interval):
    prompt = tokenizer.encode(SENTENCES[3])
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, logprobs=1, stop=["e"])
    cumulative = make_engine()
    add(cumulative, "r", prompt, params)
    expected = run_to_completion(cumulative)["r"].outputs

    engine = make_engine(stream_interval=stream_interval)
    add(engine, "r", prompt, params, output_kind=RequestOutputKind.DELTA)
    text, tokens, logprobs, finish = ["", ""], [[], []], [[], []], [None, None]
    while engine.has_unfinished_requests():
        for out in step(engine):
            for c in out.outputs:
                assert finish[c.index] is None, "nothing after the final delta"
                assert len(c.token_ids) >= stream_interval or c.finish_reason is not None
                text[c.index] += c.text
                tokens[c.index] += c.token_ids
                logprobs[c.index] += c.logprobs
                finish[c.index] = c.finish_reason
    for i, want in enumerate(expected):
        assert (text[i], tokens[i], logprobs[i], finish[i]) == (want.text, want.token_ids, want.logprobs,
                                                                want.finish_reason)


def test_metrics_and_cached_tokens(make_engine, tokenizer):
    engine = make_engine()
    prompt = tokenizer.encode(SENTENCES[0])  # 16 tokens: 3 full blocks of 4 before the last token
    add(engine, "a", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    first = run_to_completion(engine)["a"]
    add(engine, "b", prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    second = run_to_completion(engine)["b"]
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 12)
    m = engine.metrics.snapshot()
    assert m.generation_tokens_total == 7
    assert (m.prompt_tokens_total, m.prompt_tokens_cached_total) == (2 * len(prompt), 12)  # vLLM 0.34: hits included
    assert m.request_prefill_kv_computed_tokens.sum == len(prompt) + (len(prompt) - 12)
    assert (m.request_generation_tokens.sum, m.request_params_max_tokens.sum, m.request_params_n.sum) == (7, 7, 2)
    assert m.request_queue_time.count == m.request_decode_time.count == m.request_num_preemptions.count == 2
    assert m.iteration_tokens.sum == len(prompt) + (len(prompt) - 12) + 7 - 2  # the last token of each is not fed back
    assert (m.prefix_cache_queries_total, m.prefix_cache_hits_total) == (2 * len(prompt), 12)
    assert m.time_to_first_token.count == 2 and m.e2e_request_latency.count == 2
    assert m.inter_token_latency.count == 3 + 2
    assert m.request_success_total == {"length": 2}
    assert (m.num_requests_running, m.num_requests_waiting, m.kv_cache_usage) == (0, 0, 0.0)
    assert "time_to_first_token" in second.metrics and "e2e_latency" in second.metrics


def test_eos_from_the_model_ends_a_request(make_engine):
    runner = FakeModelRunner(VOCAB_SIZE, 4, next_token_fn=lambda ctx, seed: EOS_ID if len(ctx) >= 6 else 40)
    engine = make_engine(runner)
    add(engine, "r", [5, 6, 7], SamplingParams(max_tokens=10))
    add(engine, "ignore", [5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
    outputs = run_to_completion(engine)
    assert outputs["r"].outputs[0].token_ids == [40, 40, 40, EOS_ID]
    assert (outputs["r"].outputs[0].finish_reason, outputs["r"].outputs[0].stop_reason) == ("stop", None)
    assert outputs["ignore"].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_grammar_masks_follow_accepted_tokens_and_overlap_the_forward(make_engine, async_scheduling):
    grammars = []
    events: list[str] = []

    def new_matcher() -> EvenTokensGrammar:
        grammars.append(EvenTokensGrammar())
        grammars[-1].calls = events
        return grammars[-1]

    def compile_grammar(params: SamplingParams) -> SimpleNamespace:
        assert params.structured_outputs is not None and params.all_stop_token_ids == {EOS_ID}
        return SimpleNamespace(new_matcher=new_matcher)

    engine = make_engine(grammar_compiler=compile_grammar, async_scheduling=async_scheduling)
    execute = engine.runner.execute

    def logged_execute(scheduler_output):
        events.append("execute")
        return execute(scheduler_output)

    engine.runner.execute = logged_execute
    spec = StructuredOutputsParams(regex="even")
    add(engine, "g", [5, 6, 7], SamplingParams(max_tokens=4, structured_outputs=spec, ignore_eos=True))
    add(engine, "free", [5, 6, 8], SamplingParams(max_tokens=4, ignore_eos=True))
    outputs = run_to_completion(engine)
    tokens = outputs["g"].outputs[0].token_ids
    assert len(tokens) == 4 and all(t % 2 == 0 for t in tokens)
    assert any(t % 2 for t in outputs["free"].outputs[0].token_ids)
    # Each mask is computed after its step's forward was dispatched and after the previous token was
    # accepted, never ahead of it. In async scheduling the next forward is dispatched before that
    # token is known: constrained batches keep the overlap.
    if async_scheduling:
        expected = ["execute", "fill", *[e for t in tokens[:-1] for e in ("execute", f"accept {t}", "fill")],
                    f"accept {tokens[-1]}"]
    else:
        expected = [e for t in tokens for e in ("execute", "fill", f"accept {t}")]
    assert events == expected


def test_periodic_stats_line(make_engine, monkeypatch, caplog):
    monkeypatch.setattr(llm_engine, "LOG_STATS_INTERVAL_S", 0.0)
    engine = make_engine(log_stats=True)
    add(engine, "r", [5, 6, 7], SamplingParams(max_tokens=2))
    with caplog.at_level(logging.INFO, logger="jaxllm.engine.llm_engine"):
        run_to_completion(engine)
    assert any("generation throughput" in r.message and "KV cache usage" in r.message and
               "Prefix cache hit rate" in r.message for r in caplog.records)


def test_final_only_reports_once_when_finished(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=6, ignore_eos=True, seed=5)
    add(engine, "final", list(range(10, 20)), params, output_kind=RequestOutputKind.FINAL_ONLY)
    add(engine, "every", list(range(10, 20)), params)
    seen: dict[str, list] = {"final": [], "every": []}
    while engine.has_unfinished_requests():
        for out in step(engine):
            seen[out.request_id].append(out)
    assert len(seen["final"]) == 1 and seen["final"][0].finished
    assert len(seen["every"]) > 1
    assert seen["final"][0].outputs[0].token_ids == seen["every"][-1].outputs[0].token_ids
