"""The real engine on CPU (fp32): batching, chunking, prefix caching and preemption never change
greedy output; seeds reproduce; no compile after warmup; the pool ends all free."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.validation import ValidationError
from tests.e2e.conftest import assert_pool_free, backend_compiles

RNG = np.random.default_rng(0)
# Mixed lengths, from 1 to 180 tokens, random ids from the 512-token vocabulary (BOS first).
PROMPTS = [[1, *RNG.integers(3, 512, int(n) - 1).tolist()] for n in RNG.integers(1, 180, 64)]
MAX_TOKENS = RNG.integers(4, 24, 64).tolist()


def _greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True)


def _ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def batched(llm):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [_greedy(n) for n in MAX_TOKENS], use_tqdm=False)
    assert_pool_free(llm)
    return _ids(outs)


def test_batch_equals_each_alone(llm, batched):
    for i in range(0, 64, 4):  # every 4th request alone (all 64 would only repeat the point)
        alone = llm.generate({"prompt_token_ids": PROMPTS[i]}, _greedy(MAX_TOKENS[i]), use_tqdm=False)
        assert alone[0].outputs[0].token_ids == batched[i], f"request {i}"
    assert [len(t) for t in batched] == MAX_TOKENS
    assert_pool_free(llm)


def test_chunked_prefill_changes_nothing(small_llm, batched):
    """A 16-token budget chunks every prompt longer than 16 tokens."""
    idx = list(range(16))
    outs = small_llm.generate([{"prompt_token_ids": PROMPTS[i]} for i in idx],
                              [_greedy(MAX_TOKENS[i]) for i in idx], use_tqdm=False)
    assert _ids(outs) == [batched[i] for i in idx]
    assert_pool_free(small_llm)


def test_preemption_finishes_everything_with_the_same_output(llm, small_llm):
    """16 requests growing to ~6 pages each cannot all fit 40 pages: the newest are preempted
    and recomputed later, and every output equals the big pool's."""
    rng = np.random.default_rng(3)
    prompts = [{"prompt_token_ids": [1, *rng.integers(3, 512, int(n)).tolist()]} for n in rng.integers(5, 30, 16)]
    params = _greedy(64)
    before = small_llm.engine.metrics.num_preemptions_total
    small = small_llm.generate(prompts, params, use_tqdm=False)
    assert small_llm.engine.metrics.num_preemptions_total > before, "the tiny pool should have forced preemption"
    assert _ids(small) == _ids(llm.generate(prompts, params, use_tqdm=False))
    assert_pool_free(small_llm)


def test_prefix_cache_hit_equals_miss(llm):
    prompt = [1, *np.random.default_rng(9).integers(3, 512, 99).tolist()]  # 100 tokens: 6 full pages
    miss = llm.generate({"prompt_token_ids": prompt}, _greedy(12), use_tqdm=False)[0]
    hit = llm.generate({"prompt_token_ids": prompt}, _greedy(12), use_tqdm=False)[0]
    assert miss.num_cached_tokens == 0
    assert hit.num_cached_tokens == 96
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    assert_pool_free(llm)


def test_no_compile_after_warmup(llm):
    rng = np.random.default_rng(5)
    prompts = [{"prompt_token_ids": [1, *rng.integers(3, 512, int(n)).tolist()]} for n in rng.integers(1, 300, 100)]
    params = [SamplingParams(temperature=float(t), max_tokens=int(m), seed=i)
              for i, (t, m) in enumerate(zip(rng.choice([0.0, 0.8], 100), rng.integers(1, 40, 100), strict=True))]
    with backend_compiles() as compiles:
        llm.generate(prompts, params, use_tqdm=False)
    assert compiles == []
    assert_pool_free(llm)


def test_seed_reproduces_alone_and_in_a_busy_batch(llm):
    seeded = SamplingParams(temperature=1.0, max_tokens=24, seed=1234)
    alone = llm.generate({"prompt_token_ids": [1, 403, 407]}, seeded, use_tqdm=False)[0].outputs[0].text
    again = llm.generate({"prompt_token_ids": [1, 403, 407]}, seeded, use_tqdm=False)[0].outputs[0].text
    busy = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS[:20]] + [{"prompt_token_ids": [1, 403, 407]}],
        [SamplingParams(temperature=1.0, max_tokens=16)] * 20 + [seeded], use_tqdm=False,
    )[-1].outputs[0].text
    assert alone == again == busy


def test_n_returns_different_samples(llm):
    out = llm.generate("Once upon a time", SamplingParams(n=4, temperature=1.0, max_tokens=24), use_tqdm=False)[0]
    texts = [o.text for o in out.outputs]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len(set(texts)) == 4
    assert_pool_free(llm)


def test_sampling_features_through_the_runner(llm):
    prompt = {"prompt_token_ids": [1, 403, 407, 261]}
    allowed = [261, 298, 315]
    out = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=10, allowed_token_ids=allowed),
                       use_tqdm=False)[0]
    assert set(out.outputs[0].token_ids) <= set(allowed)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, logit_bias={300: 100.0}),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [300] * 5
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2),
                       use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 6
    for token, lp in zip(comp.token_ids, comp.logprobs, strict=True):
        assert token in lp and lp[token].rank == 1  # greedy picks the top token
        assert len(lp) == 3
    total = sum(lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs, strict=True))
    assert comp.cumulative_logprob == pytest.approx(total)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 4
    assert all(tok in d for tok, d in zip(prompt["prompt_token_ids"][1:], out.prompt_logprobs[1:], strict=True))
    assert_pool_free(llm)


def test_min_tokens_suppresses_eos(llm):
    # From BOS the model ends a story with EOS/BOS ids [2, 1] only after hundreds of tokens, so a
    # huge bias on EOS makes it stop at once unless min_tokens holds it back.
    params = dict(temperature=0.0, max_tokens=12, logit_bias={2: 50.0})
    eager = llm.generate({"prompt_token_ids": [1]}, SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    held = llm.generate({"prompt_token_ids": [1]}, SamplingParams(min_tokens=5, **params), use_tqdm=False)[0].outputs[0]
    assert eager.finish_reason == "stop" and len(eager.token_ids) == 1
    assert held.finish_reason == "stop" and len(held.token_ids) == 6 and 2 not in held.token_ids[:5]


def test_bad_words_are_never_completed(llm):
    """As vLLM 0.34.0: a word's last token is banned after its other tokens as outputs, also where the last of those
    is still on the device (async scheduling), and a one-token word everywhere. Unbanned, greedy writes both."""
    girl, the = [298, 315, 421], 265  # "girl" and "the" in the stories tokenizer
    prompt = "Once upon a time"
    params = [SamplingParams(temperature=0.0, max_tokens=24, bad_words=words) for words in (None, ["girl"], ["the"])]
    free, no_girl, no_the = (out.outputs[0].token_ids for out in llm.generate([prompt] * 3, params, use_tqdm=False))
    at = next(i for i in range(len(free)) if free[i : i + 3] == girl)
    assert the in free
    assert no_girl[: at + 2] == free[: at + 2] and no_girl[at + 2] != girl[2]
    assert not any(no_girl[i : i + 3] == girl for i in range(len(no_girl)))
    assert the not in no_the
    with pytest.raises(ValidationError, match="bad_words entries must tokenize to at least one token"):
        llm.generate(prompt, SamplingParams(bad_words=[" "]), use_tqdm=False)
    assert_pool_free(llm)


def test_constrained_requests_need_no_compile_after_warmup(llm):
    """The grammar-bitmask sampler variants are compiled at warmup too."""
    from jaxllm import StructuredOutputsParams

    choice = StructuredOutputsParams(choice=["yes", "no"])
    params = [SamplingParams(temperature=t, max_tokens=8, structured_outputs=choice) for t in (0.0, 1.0)]
    with backend_compiles() as compiles:
        outs = llm.generate([{"prompt_token_ids": [1, 403, 407]}] * 2, params, use_tqdm=False)
    assert compiles == []
    assert all(o.outputs[0].text in ("yes", "no") for o in outs)
    assert_pool_free(llm)


def test_a_top_k_beyond_the_vocabulary_is_no_limit(llm):
    """top_k of 2**40 (past int32) samples as top_k = the vocabulary, with the same seed, and the engine lives."""
    params = dict(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    huge = llm.generate({"prompt_token_ids": [1, 403]}, SamplingParams(top_k=2**40, **params), use_tqdm=False)
    off = llm.generate({"prompt_token_ids": [1, 403]}, SamplingParams(top_k=llm.engine.vocab_size, **params),
                       use_tqdm=False)
    assert len(huge[0].outputs[0].token_ids) == 6
    assert huge[0].outputs[0].token_ids == off[0].outputs[0].token_ids
    assert_pool_free(llm)


def test_decode_steps_feed_the_forward_from_the_same_buffers(llm):
    """Consecutive steps of one bucket hand the compiled forward its inputs at the same device
    addresses (what lets XLA's CUDA graphs replay without an update on a GPU)."""
    compiler = llm.engine.runner.compiler
    compiled_forward = compiler.forward
    seen = []

    def recording(num_tokens, pages_per_seq):
        forward = compiled_forward(num_tokens, pages_per_seq)

        def run(leaves, kv_pages, batch, placeholder_rows, prev_tokens):
            seen.append((num_tokens, pages_per_seq, _buffer_pointers((batch, placeholder_rows))))
            return forward(leaves, kv_pages, batch, placeholder_rows, prev_tokens)

        return run

    compiler.forward = recording
    try:
        out = llm.generate({"prompt_token_ids": [1, 403, 407]}, _greedy(6), use_tqdm=False)
    finally:
        del compiler.forward
    assert len(out[0].outputs[0].token_ids) == 6
    assert len(seen) == 6 and len({(t, p) for t, p, _ in seen}) == 1  # one bucket throughout
    assert all(pointers == seen[0][2] for _, _, pointers in seen)
    assert_pool_free(llm)


def _buffer_pointers(tree) -> list[int]:
    return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree)]


# The sampling fields of README's examples: the openai client's extra_body, LLM.generate's SamplingParams.
README_SAMPLING = ({"top_k": 20, "repetition_penalty": 1.05}, {"temperature": 0.8, "top_p": 0.95})


def test_default_top_p_from_the_generation_config_needs_no_compile_after_warmup(tmp_path):
    """A generation config that makes top-p every request's default (as Llama-3 instruct's does)
    gets that sampler variant compiled at warmup, not on the first request of each batch size; so do
    README's sampling examples."""
    import json

    from jaxllm import LLM
    from jaxllm.config import DEFAULT_MODEL
    from tests.e2e.conftest import COMMON

    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    llm = LLM(DEFAULT_MODEL, max_num_seqs=16, max_num_batched_tokens=16, token_buckets=[16],
              generation_config=str(tmp_path), **COMMON)
    assert llm.default_sampling_params().top_p == 0.9
    with backend_compiles() as compiles:
        outs = llm.generate(["Once upon a time", "The cat"], use_tqdm=False)  # the defaults
        outs += llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        for fields in README_SAMPLING:  # as given and over the defaults (served)
            for params in (SamplingParams(**fields), llm.default_sampling_params().clone(**fields)):
                outs += llm.generate(["Once upon a time"], params.clone(max_tokens=4), use_tqdm=False)
    assert compiles == []
    assert all(o.outputs[0].token_ids for o in outs)
    assert_pool_free(llm)


def test_startup_heap_is_frozen_out_of_the_collector(llm):
    """Everything alive after start-up is frozen, so full collections while serving skip it."""
    import gc

    assert gc.get_freeze_count() > 10_000
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4
