"""Incremental detokenization (UTF-8 safe) and stop conditions, with real tokenizers."""

from __future__ import annotations

import pytest

from jaxllm.engine.detokenizer import Finish, IncrementalDetokenizer, OutputDetokenizer
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import EOS_ID
from tests.fixtures import fixture_tokenizer

BOS_ID = 1
MULTIBYTE = "Hi 😀 你好 é, 𝔘𝔫𝔦 🦙🧬 ok"


@pytest.fixture(scope="module")
def llama3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_tokenizer("llama3"))


@pytest.fixture(params=["stories260K", "llama3"])
def any_tokenizer(request, tokenizer, llama3_tokenizer):
    return tokenizer if request.param == "stories260K" else llama3_tokenizer


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_multibyte_text_token_by_token_never_breaks_a_character(any_tokenizer):
    prompt = encode(any_tokenizer, "Once upon a time")
    output = encode(any_tokenizer, " " + MULTIBYTE)
    assert any("\ufffd" in any_tokenizer.decode([t]) for t in output)  # some characters span several tokens
    detok = IncrementalDetokenizer(any_tokenizer, prompt)
    deltas = [detok.decode_next(t) for t in output]
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # held back while a character was incomplete
    full = any_tokenizer.decode(prompt + output)
    assert "".join(deltas) == full[len(any_tokenizer.decode(prompt)):]


def test_prompt_ending_mid_character(tokenizer):
    ids = encode(tokenizer, "Once upon a time 😀 ok")
    prompt, output = ids[:-4], ids[-4:]  # the prompt ends after two of the emoji's four byte tokens
    assert tokenizer.decode(prompt).endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.decode_next(t) for t in output]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == "😀 ok"


@pytest.mark.parametrize("spaces, expected", [(True, " Hi <s> ok"), (False, " Hi<s>ok")])
def test_special_tokens_kept_and_spaced(tokenizer, spaces, expected):
    prompt = encode(tokenizer, "Once")
    output = encode(tokenizer, " Hi") + [BOS_ID] + encode(tokenizer, " ok")
    kept = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=False, spaces_between_special_tokens=spaces)
    assert "".join(kept.decode_next(t) for t in output) == expected
    skipped = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(skipped.decode_next(t) for t in output) == " Hi ok"


def run(tokenizer, output_ids: list[int], *, prompt: str = "Once upon a time", max_tokens: int = 64,
        max_model_len: int = 512, **params) -> tuple[OutputDetokenizer, list[str]]:
    """Feed output_ids one by one until finished; returns the detokenizer and the text emitted after each."""
    prompt_ids = encode(tokenizer, prompt)
    sampling = SamplingParams(max_tokens=max_tokens, **params)
    sampling.all_stop_token_ids = {EOS_ID}
    detok = OutputDetokenizer(tokenizer, prompt_ids, sampling, max_tokens, max_model_len)
    emitted = []
    for token_id in output_ids:
        if detok.update([token_id]) is not None:
            emitted.append(detok.text_to_emit())
            break
        emitted.append(detok.text_to_emit())
    return detok, emitted


STORY = " there was a little girl. She liked to play."
STOP = "le gir"  # spans "▁little" and "▁g" + "ir"


def test_stop_string_across_tokens_is_removed_and_never_streamed(tokenizer):
    ids = encode(tokenizer, STORY)
    assert not any(STOP in tokenizer.decode([t]) for t in ids)
    detok, emitted = run(tokenizer, ids, stop=["zzz", STOP])
    assert detok.finish == Finish("stop", STOP)
    assert detok.output_text == " there was a litt"
    assert emitted[-1] == detok.output_text
    for text in emitted:  # the stream only ever grows, and never shows a piece of the stop string
        assert detok.output_text.startswith(text)
    assert len(detok.token_ids) < len(ids)


def test_include_stop_str_in_output(tokenizer):
    detok, emitted = run(tokenizer, encode(tokenizer, STORY), stop=[STOP], include_stop_str_in_output=True)
    assert detok.finish == Finish("stop", STOP)
    assert detok.output_text == " there was a little gir"
    assert emitted[-1] == detok.output_text


def test_earliest_stop_string_wins(tokenizer):
    detok, _ = run(tokenizer, encode(tokenizer, STORY), stop=["girl", "was a"])
    assert detok.finish == Finish("stop", "was a") and detok.output_text == " there "


def test_eos_stops_unless_ignore_eos(tokenizer):
    ids = encode(tokenizer, " Hi") + [EOS_ID] + encode(tokenizer, " ok")
    detok, _ = run(tokenizer, ids)
    assert detok.finish == Finish("stop", None) and detok.output_text == " Hi" and len(detok.token_ids) == 3
    detok, _ = run(tokenizer, ids, ignore_eos=True, max_tokens=len(ids))
    assert detok.finish == Finish("length") and detok.output_text == " Hi ok"


def test_stop_token_ids_set_stop_reason(tokenizer):
    ids = encode(tokenizer, STORY)
    stop_id = ids[3]
    detok, _ = run(tokenizer, ids, stop_token_ids=[stop_id])
    assert detok.finish == Finish("stop", stop_id)
    assert detok.token_ids == ids[:4]
    prompt = encode(tokenizer, "Once upon a time")
    assert detok.output_text == tokenizer.decode(prompt + ids[:3])[len(tokenizer.decode(prompt)):]
    kept, _ = run(tokenizer, ids, stop_token_ids=[stop_id], include_stop_str_in_output=True)
    assert kept.output_text.startswith(detok.output_text) and len(kept.output_text) > len(detok.output_text)


def test_min_tokens_suppresses_eos_and_stop_strings(tokenizer):
    ids = encode(tokenizer, " Hi") + [EOS_ID] + encode(tokenizer, STORY) + [EOS_ID]
    detok, _ = run(tokenizer, ids, min_tokens=3, stop=["Hi"])
    assert detok.finish == Finish("stop", None)  # the first EOS and the early "Hi" were too soon
    assert len(detok.token_ids) == len(ids)
    detok, _ = run(tokenizer, ids, min_tokens=3, stop=["girl"])
    assert detok.finish == Finish("stop", "girl")
    assert detok.output_text == " Hi there was a little "


def test_max_tokens_and_context_length(tokenizer):
    ids = encode(tokenizer, STORY)
    detok, emitted = run(tokenizer, ids, max_tokens=5)
    assert detok.finish == Finish("length") and detok.token_ids == ids[:5] and len(emitted) == 5
    num_prompt = len(encode(tokenizer, "Once upon a time"))
    detok, _ = run(tokenizer, ids, max_model_len=num_prompt + 3)
    assert detok.finish == Finish("length") and detok.token_ids == ids[:3]


def test_detokenize_false_still_stops_on_tokens(tokenizer):
    ids = encode(tokenizer, " Hi") + [EOS_ID]
    detok, _ = run(tokenizer, ids, detokenize=False)
    assert detok.finish == Finish("stop", None) and detok.output_text == ""


def test_stream_detokenizer_matches_the_window_detokenizer(any_tokenizer):
    """The Rust stream path (the default for fast tokenizers) gives the same deltas as the window."""
    from jaxllm.engine.detokenizer import StreamDetokenizer, make_incremental_detokenizer

    prompt = encode(any_tokenizer, "Once upon a time")
    output = encode(any_tokenizer, " " + MULTIBYTE + " and then")
    fast = make_incremental_detokenizer(any_tokenizer, prompt)
    assert isinstance(fast, StreamDetokenizer)
    slow = IncrementalDetokenizer(any_tokenizer, prompt)
    assert [fast.decode_next(t) for t in output] == [slow.decode_next(t) for t in output]
    assert fast.fallback is None


def test_stream_detokenizer_falls_back_instead_of_failing(tokenizer):
    """If the stream decoder raises (it does, "Invalid prefix", on some byte-token soups), the
    window detokenizer takes over with the tokens so far as context: no error, no lost text."""
    from jaxllm.engine.detokenizer import make_incremental_detokenizer

    class Broken:
        def step(self, backend, token_id):
            raise Exception("Invalid prefix encountered while decoding stream")

    prompt = encode(tokenizer, "Once upon a time")
    words = encode(tokenizer, " there was a girl named Lily")
    detok = make_incremental_detokenizer(tokenizer, prompt)
    first = "".join(detok.decode_next(t) for t in words[:3])
    detok.stream = Broken()
    rest = "".join(detok.decode_next(t) for t in words[3:])
    assert detok.fallback is not None
    assert first + rest == " there was a girl named Lily"


@pytest.fixture(scope="module", params=["stories260K", "llama3", "qwen2.5", "llama2"])
def every_tokenizer(request, tokenizer):
    from transformers import AutoTokenizer

    return tokenizer if request.param == "stories260K" else AutoTokenizer.from_pretrained(
        fixture_tokenizer(request.param))


def _final_text(tokenizer, prompt_ids, output_ids, defer: bool, **params) -> tuple[str, Finish | None]:
    sampling = SamplingParams(max_tokens=len(output_ids), **params)
    sampling.all_stop_token_ids = {tokenizer.eos_token_id}
    detok = OutputDetokenizer(tokenizer, prompt_ids, sampling, len(output_ids), 4096, defer_text=defer)
    for token_id in output_ids:
        if detok.update([token_id]) is not None:
            break
    return detok.text_to_emit(), detok.finish


def test_deferred_text_equals_token_by_token_text(every_tokenizer):
    """The one-call decode of a finished output (offline, final-only requests) gives exactly the text
    the token-by-token path gives: random token soups (byte tokens, partial characters, special
    tokens), prompts ending mid-character, EOS with and without its text."""
    import random

    tok = every_tokenizer
    rng = random.Random(0)
    vocab = len(tok)
    multibyte = encode(tok, MULTIBYTE)
    cases = []
    for i in range(150):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
        if i % 3 == 0:  # a prompt ending inside a character
            prompt += multibyte[: rng.randrange(1, len(multibyte))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        if i % 4 == 0:
            output = multibyte[rng.randrange(len(multibyte)):] + output
        if i % 5 == 0:
            output.insert(rng.randrange(len(output) + 1), tok.eos_token_id)
        cases.append((prompt, output, {"include_stop_str_in_output": i % 2 == 0, "skip_special_tokens": i % 7 != 0}))
    for prompt, output, params in cases:
        assert _final_text(tok, prompt, output, True, **params) == _final_text(tok, prompt, output, False, **params)


def test_deferred_text_is_not_used_with_stop_strings(tokenizer):
    """Stop strings are searched in the text as it grows, so their requests decode token by token."""
    prompt_ids = encode(tokenizer, "Once upon a time")
    sampling = SamplingParams(max_tokens=64, stop=["girl"])
    detok = OutputDetokenizer(tokenizer, prompt_ids, sampling, 64, 512, defer_text=True)
    assert not detok.defer_text
    detok.update(encode(tokenizer, STORY))
    assert detok.finish == Finish("stop", "girl") and detok.text_to_emit() == " there was a little "


def test_deferred_text_read_before_the_end_then_more_tokens(every_tokenizer):
    """Text read early (an abort, or a caller peeking) and tokens after it still add up to the
    token-by-token text."""
    tok = every_tokenizer
    prompt = encode(tok, "Once upon a time")
    output = encode(tok, " " + MULTIBYTE + " and then they went home")
    sampling = SamplingParams(max_tokens=len(output) + 1)
    sampling.all_stop_token_ids = {tok.eos_token_id}
    deferred = OutputDetokenizer(tok, prompt, sampling, len(output) + 1, 4096, defer_text=True)
    eager = OutputDetokenizer(tok, prompt, sampling, len(output) + 1, 4096)
    half = len(output) // 2
    for d in (deferred, eager):
        d.update(output[:half])
    assert deferred.output_text == "" and deferred.text_to_emit() == eager.text_to_emit()
    for d in (deferred, eager):
        d.update(output[half:])
    assert deferred.text_to_emit() == eager.text_to_emit()


def test_deferred_text_takes_one_decode_call_for_byte_level_tokenizers(llama3_tokenizer):
    """Llama-3's byte-level decoder: a random-token output (invalid UTF-8 and all, as a dummy-weight
    benchmark makes) is decoded in one call, never stepped token by token."""
    import random

    rng = random.Random(1)
    prompt = encode(llama3_tokenizer, "Once upon a time")
    output = [rng.randrange(128000) for _ in range(200)]
    sampling = SamplingParams(max_tokens=len(output), ignore_eos=True)
    sampling.all_stop_token_ids = {llama3_tokenizer.eos_token_id}
    detok = OutputDetokenizer(llama3_tokenizer, prompt, sampling, len(output), 4096, defer_text=True)
    assert detok.update(output) == Finish("length")
    text = detok.text_to_emit()
    assert detok.decoder.untouched and detok.decoder.stream is None
    assert text == _final_text(llama3_tokenizer, prompt, output, False, ignore_eos=True)[0]
