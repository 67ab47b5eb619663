"""`LLM.beam_search` on the real stories260K model: against a brute-force search over the model's own logprobs,
and its beams on the prompt's KV pages through the prefix cache."""

from __future__ import annotations

import itertools

import pytest

from jaxllm import BeamSearchParams, SamplingParams
from tests.e2e.conftest import assert_pool_free

WIDTH = 3


def top_logprobs(llm, prompt_token_ids: list[int]) -> dict[int, float]:
    """The model's 2 * WIDTH most likely next tokens after a prompt, with their logprobs."""
    (out,) = llm.generate([{"prompt_token_ids": prompt_token_ids}],
                          SamplingParams(max_tokens=1, logprobs=2 * WIDTH, temperature=0), use_tqdm=False)
    return {token_id: p.logprob for token_id, p in out.outputs[0].logprobs[0].items()}


def path_logprob(llm, prompt_token_ids: list[int], path: list[int]) -> float:
    """The model's logprob of `path` after the prompt, read from the prompt logprobs of prompt + path."""
    (out,) = llm.generate([{"prompt_token_ids": prompt_token_ids + path}],
                          SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return sum(out.prompt_logprobs[len(prompt_token_ids) + i][token].logprob for i, token in enumerate(path))


def test_two_steps_equal_a_brute_force_search_over_the_models_logprobs(small_llm) -> None:
    prompt = small_llm.get_tokenizer().encode("Once upon a time, there was a little dog")
    result = small_llm.beam_search([{"prompt_token_ids": prompt}],
                                   BeamSearchParams(beam_width=WIDTH, max_tokens=2, ignore_eos=True))
    # Width WIDTH keeps the WIDTH likeliest first tokens; every second token of each is then a candidate.
    first = top_logprobs(small_llm, prompt)
    kept = sorted(first, key=first.get, reverse=True)[:WIDTH]
    paths = {(a, b): first[a] + lp for a in kept for b, lp in top_logprobs(small_llm, prompt + [a]).items()}
    best = sorted(paths, key=paths.get, reverse=True)[:WIDTH]
    (output,) = result
    assert [seq.tokens for seq in output.sequences] == [prompt + list(path) for path in best]
    assert [seq.cum_logprob for seq in output.sequences] == pytest.approx([paths[p] for p in best], abs=1e-4)
    tokenizer = small_llm.get_tokenizer()
    assert [seq.text for seq in output.sequences] == [tokenizer.decode(prompt + list(p), skip_special_tokens=True)
                                                      for p in best]
    # The same scores through another path of the model: the sequences' own prompt logprobs.
    for seq in output.sequences:
        assert seq.cum_logprob == pytest.approx(path_logprob(small_llm, prompt, seq.tokens[len(prompt):]), abs=1e-4)
    assert_pool_free(small_llm)


def test_a_beam_as_wide_as_the_allowed_paths_finds_the_exhaustive_ranking(small_llm) -> None:
    """With allowed_token_ids of 3 ids and 2 steps there are 9 paths: a beam of 9 never prunes one, so its
    ranking is an exhaustive search's, here over the model's own logprobs of each path (prompt logprobs)."""
    prompt = small_llm.get_tokenizer().encode("The cat sat on the")
    allowed = sorted(top_logprobs(small_llm, prompt))[:3]  # three of the likely next ids
    (output,) = small_llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(
        beam_width=9, max_tokens=2, ignore_eos=True, allowed_token_ids=allowed, length_penalty=0.0))
    logprob = {path: path_logprob(small_llm, prompt, list(path)) for path in itertools.product(allowed, repeat=2)}
    ranking = sorted(logprob, key=logprob.get, reverse=True)
    assert [tuple(seq.tokens[len(prompt):]) for seq in output.sequences] == ranking
    assert [seq.cum_logprob for seq in output.sequences] == pytest.approx([logprob[p] for p in ranking], abs=1e-4)


def test_beams_share_the_prompts_kv_pages(small_llm) -> None:
    """Each beam of a step is a new request on its prompt's cached full pages: a 40-token prompt (pages of 16)
    computes its 40 tokens once; the 2 beams of each later step find 32 of theirs in the cache."""
    block_manager = small_llm.engine.block_manager
    assert block_manager.block_size == 16
    prompt = [(7 * i + 3) % 500 + 5 for i in range(40)]  # a prefix no other test caches
    queries, hits = block_manager.prefix_cache_queries, block_manager.prefix_cache_hits
    (output,) = small_llm.beam_search([{"prompt_token_ids": prompt}],
                                      BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True))
    assert len(output.sequences) == 2 and all(len(seq.tokens) == 43 for seq in output.sequences)
    assert block_manager.prefix_cache_queries - queries == 40 + 2 * 41 + 2 * 42
    assert block_manager.prefix_cache_hits - hits == 4 * 32
    assert_pool_free(small_llm)


def test_every_prompt_gets_its_own_beams(small_llm) -> None:
    prompts = ["Lily", "Once upon a time"]
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    together = small_llm.beam_search(prompts, params)
    alone = [small_llm.beam_search(prompt, params)[0] for prompt in prompts]
    one_at_a_time = small_llm.beam_search(prompts, params, concurrency_limit=1)
    tokens = [[seq.tokens for seq in out.sequences] for out in together]
    assert [[seq.tokens for seq in out.sequences] for out in alone] == tokens
    assert [[seq.tokens for seq in out.sequences] for out in one_at_a_time] == tokens
    tokenizer = small_llm.get_tokenizer()
    for prompt, out in zip(prompts, together, strict=True):
        ids = tokenizer.encode(prompt)
        assert len(out.sequences) == 2 and all(seq.tokens[:len(ids)] == ids for seq in out.sequences)
