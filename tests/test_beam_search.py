"""jaxllm.beam_search against next-token distributions worked out by hand, and against exhaustive search."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from jaxllm.beam_search import BeamSearch, BeamSearchParams, beam_score
from jaxllm.outputs import Logprob

EOS = 3
PROMPT = [7, 7]


def step(search: BeamSearch, next_token: dict[int, dict[int, float]]) -> None:
    """One step as the engine would score it, with next_token[last token] as the next-token distribution."""
    search.advance([{t: Logprob(math.log(p)) for t, p in next_token[beam.tokens[-1]].items()}
                    for beam in search.live])


def run(search: BeamSearch, next_token: dict[int, dict[int, float]]) -> None:
    while not search.done:
        step(search, next_token)


# After the prompt: 1 is likeliest, EOS next; after 1 the search goes on; after 2, EOS is nearly certain.
HAND = {7: {1: 0.5, EOS: 0.3, 2: 0.2}, 1: {1: 0.5, 2: 0.3, EOS: 0.2}, 2: {EOS: 0.9, 1: 0.05, 2: 0.05}}


@pytest.mark.parametrize(("length_penalty", "best"), [
    # Scores are cumulative logprobs: the one-token [EOS] (0.3) beats [1, 1] (0.5 * 0.5).
    (0.0, [([EOS], "stop", 0.3), ([1, 1], "length", 0.25)]),
    # Divided by the length: [1, 1] (log 0.25 / 2) first, then [2, EOS] (log 0.18 / 2), which came from the
    # second beam (2, kept beside 1 after EOS finished) and beats [EOS] (log 0.3 / 1).
    (1.0, [([1, 1], "length", 0.25), ([2, EOS], "stop", 0.18)]),
])
def test_length_penalty_ranks_the_finished_and_live_beams(length_penalty: float, best: list) -> None:
    search = BeamSearch(PROMPT, BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=length_penalty),
                        {EOS}, max_model_len=100)
    run(search, HAND)
    got = search.best()
    assert [(b.tokens[len(PROMPT):], b.finish_reason) for b in got] == [(t, r) for t, r, _ in best]
    assert [b.cum_logprob for b in got] == pytest.approx([math.log(p) for _, _, p in best])
    assert [b.stop_reason for b in got] == [EOS if r == "stop" else None for _, r, _ in best]
    # The server's ids leave EOS out unless include_stop_str_in_output; the logprobs keep one dict per token.
    assert [search.generated_token_ids(b) for b in got] == [[t for t in tokens if t != EOS] for tokens, _, _ in best]
    assert all(len(b.logprobs) == len(b.tokens) - len(PROMPT) for b in got)


def test_live_beams_are_the_best_continuations_not_the_greedy_one() -> None:
    """Width 2 over one step keeps 1 and 2 (EOS finished apart), and after two steps [1, 1] and [1, 2]."""
    search = BeamSearch(PROMPT, BeamSearchParams(beam_width=2, max_tokens=2), {EOS}, max_model_len=100)
    step(search, HAND)
    assert [b.tokens[len(PROMPT):] for b in search.live] == [[1], [2]]
    assert [b.tokens[len(PROMPT):] for b in search.finished] == [[EOS]]
    step(search, HAND)
    assert [b.tokens[len(PROMPT):] for b in search.live] == [[1, 1], [1, 2]]
    assert search.done


def exhaustive(prompt: list[int], next_token: dict[int, dict[int, float]], max_tokens: int,
               length_penalty: float) -> list[tuple[list[int], float]]:
    """Every sequence the distribution allows (ending at EOS or at max_tokens), best score first."""
    sequences = []
    for length in range(1, max_tokens + 1):
        for tokens in itertools.product(*[list(next_token[7])] * length):
            if EOS in tokens[:-1] or (length < max_tokens and tokens[-1] != EOS):
                continue
            context = prompt + list(tokens)
            cum = sum(math.log(next_token[context[i - 1]][context[i]]) for i in range(len(prompt), len(context)))
            sequences.append((list(tokens), beam_score(length, cum, length_penalty)))
    return sorted(sequences, key=lambda s: s[1], reverse=True)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_a_beam_as_wide_as_the_tree_finds_what_exhaustive_search_finds(length_penalty: float) -> None:
    rng = random.Random(0)
    vocab = [0, 1, 2, EOS, 7]
    next_token = {}
    for last in vocab:
        weights = [rng.random() for _ in vocab]
        next_token[last] = {t: w / sum(weights) for t, w in zip(vocab, weights, strict=True)}
    max_tokens = 3
    reference = exhaustive(PROMPT, next_token, max_tokens, length_penalty)
    width = len(reference)  # no beam is ever pruned
    search = BeamSearch(PROMPT, BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                                 length_penalty=length_penalty), {EOS}, max_model_len=100)
    run(search, next_token)
    got = [(b.tokens[len(PROMPT):], beam_score(len(b.logprobs), b.cum_logprob, length_penalty))
           for b in search.best()]
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in reference]
    assert [score for _, score in got] == pytest.approx([score for _, score in reference])


def test_ignore_eos_grows_through_eos() -> None:
    search = BeamSearch(PROMPT, BeamSearchParams(beam_width=1, max_tokens=3, ignore_eos=True), {EOS}, 100)
    run(search, {t: {EOS: 0.9, 1: 0.1} for t in (7, EOS)})
    (best,) = search.best()
    assert best.tokens[len(PROMPT):] == [EOS] * 3 and best.finish_reason == "length"


def test_a_beam_that_fills_the_context_ends_with_length() -> None:
    search = BeamSearch(PROMPT, BeamSearchParams(beam_width=1, max_tokens=10), {EOS}, max_model_len=4)
    run(search, {t: {1: 1.0} for t in (7, 1)})
    (best,) = search.best()
    assert best.tokens == PROMPT + [1, 1] and best.finish_reason == "length" and search.num_steps == 2


def test_an_aborted_search_keeps_its_live_beams() -> None:
    search = BeamSearch(PROMPT, BeamSearchParams(beam_width=2, max_tokens=5), {EOS}, 100)
    search.abort()
    assert search.done
    (best,) = search.best()  # the prompt alone: nothing generated, scored as one token
    assert best.tokens == PROMPT and best.finish_reason == "abort" and best.cum_logprob == 0.0


def test_include_stop_str_keeps_eos_in_the_served_ids() -> None:
    search = BeamSearch(PROMPT, BeamSearchParams(beam_width=1, max_tokens=2, include_stop_str_in_output=True),
                        {EOS}, 100)
    run(search, {7: {EOS: 1.0}})
    (best,) = search.best()
    assert search.generated_token_ids(best) == [EOS] and best.finish_reason == "stop"


def test_allowed_token_ids_are_the_only_candidates() -> None:
    """The engine scores the allowed ids plus its sampled token (here 1, not allowed); an allowed id the model
    rules out (-inf) is no candidate either."""
    params = BeamSearchParams(beam_width=3, max_tokens=1, allowed_token_ids=[0, 2, 4])
    search = BeamSearch(PROMPT, params, {EOS}, 100)
    search.advance([{1: Logprob(-0.1), 0: Logprob(-3.0), 2: Logprob(-2.0), 4: Logprob(-math.inf)}])
    assert [b.tokens[len(PROMPT):] for b in search.best()] == [[2], [0]]
    step = params.step_params()
    assert (step.logprobs, step.logprob_token_ids, step.max_tokens) == (None, [0, 2, 4], 1)
    with pytest.raises(ValueError, match="allowed_token_ids must not be empty"):
        BeamSearchParams(beam_width=1, max_tokens=1, allowed_token_ids=[])


def test_score_is_vllms() -> None:
    assert beam_score(4, -2.0, 1.0) == -0.5
    assert beam_score(4, -2.0, 0.5) == -1.0
    assert beam_score(0, -2.0, 2.0) == -2.0  # an aborted beam with nothing generated counts as one token


def test_step_params_ask_for_one_token_with_twice_the_width_of_logprobs() -> None:
    params = BeamSearchParams(beam_width=3, max_tokens=8, temperature=0.5).step_params()
    assert (params.max_tokens, params.logprobs, params.temperature) == (1, 6, 0.5)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=8)
