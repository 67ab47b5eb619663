"""vLLM 0.34.0's request fields and response keys (issue 20), through the openai SDK and raw HTTP: their
defaults, key presence (null when unused), and the 400s that name them.

Two servers over the stand-in engine: `plain` with vLLM's default flags, and `flagged` with
--enable-prompt-tokens-details --enable-per-request-metrics --enable-force-include-usage
--return-tokens-as-token-ids --reasoning-parser deepseek_r1 --max-logprobs -1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from serve.reasoning_parsers import get_reasoning_parser
from tests.serve.conftest import MODEL_NAMES, LiveServer, make_context, new_engine, sse_events

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Once upon a time"}]
FLAGS = {"enable_prompt_tokens_details": True, "enable_per_request_metrics": True,
         "enable_force_include_usage": True, "return_tokens_as_token_ids": True, "reasoning_parser": "deepseek_r1"}
METRICS = ["time_to_first_token_ms", "generation_time_ms", "queue_time_ms", "mean_itl_ms", "tokens_per_second",
           "speculative_decoding"]


def _serve(tokenizer: Any, script: list[int], max_logprobs: int = 20, **flags: Any) -> Iterator[httpx.Client]:
    engine = new_engine(tokenizer, script, max_logprobs=max_logprobs)
    with LiveServer(make_context(engine, **flags)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def plain(stories_tokenizer: Any, story_script: list[int]) -> Iterator[httpx.Client]:
    yield from _serve(stories_tokenizer, story_script)


@pytest.fixture(scope="module")
def flagged(stories_tokenizer: Any, story_script: list[int]) -> Iterator[httpx.Client]:
    yield from _serve(stories_tokenizer, story_script, max_logprobs=-1, **FLAGS)


def stream(client: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    return events[:-1]


def error(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    return response.json()["error"]


# ---- stream_options and usage ----


def test_empty_stream_options_add_no_usage_chunk_and_need_no_stream(plain: httpx.Client) -> None:
    sdk = openai.OpenAI(base_url=str(plain.base_url) + "/v1", api_key="none", max_retries=0)
    chunks = list(sdk.chat.completions.create(model=MODEL_NAMES[0], messages=HI, max_tokens=3, stream=True,
                                              stream_options={}))
    assert all(c.choices[0].index == 0 and c.usage is None for c in chunks)  # a client reading choices[0] works
    events = stream(plain, COMPLETIONS, {"prompt": "Lily", "max_tokens": 3, "stream_options": {}})
    assert all(e["choices"] and "usage" not in e for e in events)
    assert plain.post(COMPLETIONS, json={"prompt": "Lily", "max_tokens": 1, "stream_options": {}}).status_code == 200


def test_default_usage_keys(plain: httpx.Client) -> None:
    usage = plain.post(COMPLETIONS, json={"prompt": "Lily", "max_tokens": 2}).json()["usage"]
    assert usage == {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"] + 2,
                     "completion_tokens": 2, "completion_tokens_details": None}
    final = stream(plain, CHAT, {"messages": HI, "max_tokens": 2, "stream_options": {"include_usage": True}})[-1]
    assert final["choices"] == [] and set(final["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens"}
    assert "metrics" not in final


def test_flags_add_prompt_tokens_details_metrics_and_usage_on_every_chunk(flagged: httpx.Client) -> None:
    body = flagged.post(COMPLETIONS, json={"prompt": "Once upon a time", "max_tokens": 4}).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "created_cache_tokens": None,
                                                      "multimodal_tokens": None}
    metrics = body["metrics"]
    assert list(metrics) == METRICS and metrics["speculative_decoding"] is None
    assert all(metrics[k] >= 0 for k in METRICS[:-1]) and metrics["tokens_per_second"] > 0
    events = stream(flagged, COMPLETIONS, {"prompt": "Lily", "max_tokens": 3})  # no stream_options
    assert all("usage" in e for e in events)
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == sorted(e["usage"]["completion_tokens"]
                                                                            for e in events[:-1])
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert list(final["metrics"]) == METRICS[:-1]
    assert flagged.post(COMPLETIONS, json={"prompt": "Lily", "max_tokens": 2, "n": 2}).json()["metrics"] is None


def test_reasoning_tokens_with_a_reasoning_parser(flagged: httpx.Client, plain: httpx.Client,
                                                  stories_tokenizer: Any) -> None:
    body = flagged.post(CHAT, json={"messages": HI, "max_tokens": 5, "temperature": 0}).json()
    reasoning = body["choices"][0]["message"]["reasoning"]  # no </think>: the whole output is a cut-off thought
    expected = len(stories_tokenizer.encode(reasoning, add_special_tokens=False))
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": expected}
    streamed = stream(flagged, CHAT, {"messages": HI, "max_tokens": 5, "temperature": 0})
    assert streamed[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": expected}
    assert plain.post(CHAT, json={"messages": HI, "max_tokens": 2}).json()["usage"]["completion_tokens_details"] is None


class _TagTokenizer:
    """Ids are characters' code points; `<think>` and `</think>` are single tokens (1 and 2)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return {"<think>": [1], "</think>": [2]}.get(text, [ord(c) for c in text])


def test_reasoning_tokens_are_counted_on_token_ids_between_the_tags() -> None:
    parser, tok = get_reasoning_parser("qwen3"), _TagTokenizer()
    assert parser.count_reasoning_tokens([1, 70, 71, 72, 2, 80], tok) == 3
    assert parser.count_reasoning_tokens([70, 71, 2, 80, 81], tok) == 2  # <think> written by the template
    assert parser.count_reasoning_tokens([1, 70, 71], tok) == 2  # cut off: all of it
    assert get_reasoning_parser("qwen3", {"enable_thinking": False}).count_reasoning_tokens([70, 2, 80], tok) == 0


# ---- return_token_ids, prompt_logprobs ----


def test_return_token_ids_and_prompt_logprobs_keys_are_null_when_unused(plain: httpx.Client) -> None:
    choice = plain.post(COMPLETIONS, json={"prompt": "Lily", "max_tokens": 2}).json()["choices"][0]
    assert choice["token_ids"] is None and choice["prompt_token_ids"] is None and choice["prompt_logprobs"] is None
    body = plain.post(CHAT, json={"messages": HI, "max_tokens": 2}).json()
    assert body["choices"][0]["token_ids"] is None and body["prompt_token_ids"] is None
    assert body["prompt_logprobs"] is None and body["metrics"] is None
    events = stream(plain, CHAT, {"messages": HI, "max_tokens": 2})
    assert events[0]["prompt_token_ids"] is None and all(e["choices"][0]["token_ids"] is None for e in events[1:])


def test_return_token_ids(plain: httpx.Client, stories_tokenizer: Any) -> None:
    prompt_ids = stories_tokenizer.encode("Lily")
    greedy = {"max_tokens": 4, "return_token_ids": True, "temperature": 0}
    choice = plain.post(COMPLETIONS, json={"prompt": "Lily", **greedy}).json()["choices"][0]
    assert choice["prompt_token_ids"] == prompt_ids and len(choice["token_ids"]) == 4
    events = stream(plain, COMPLETIONS, {"prompt": "Lily", **greedy})
    assert events[0]["choices"][0]["prompt_token_ids"] == prompt_ids
    assert all(e["choices"][0]["prompt_token_ids"] is None for e in events[1:])
    assert sum((e["choices"][0]["token_ids"] for e in events), []) == choice["token_ids"]
    body = plain.post(CHAT, json={"messages": HI, **greedy}).json()
    assert body["prompt_token_ids"] == stories_tokenizer.encode("Once upon a time")
    events = stream(plain, CHAT, {"messages": HI, **greedy})
    assert events[0]["prompt_token_ids"] == body["prompt_token_ids"]
    assert sum((e["choices"][0]["token_ids"] for e in events[1:]), []) == body["choices"][0]["token_ids"]


def test_prompt_logprobs_on_completion_choices_and_chat_responses(plain: httpx.Client,
                                                                   stories_tokenizer: Any) -> None:
    prompt_ids = stories_tokenizer.encode("Lily")
    choice = plain.post(COMPLETIONS, json={"prompt": "Lily", "max_tokens": 1, "prompt_logprobs": 1}
                        ).json()["choices"][0]
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(prompt_ids)
    for token_id, position in zip(prompt_ids[1:], choice["prompt_logprobs"][1:], strict=True):
        assert set(position[str(token_id)]) == {"logprob", "rank", "decoded_token"}
    body = plain.post(CHAT, json={"messages": HI, "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"]) == len(
        stories_tokenizer.encode("Once upon a time"))
    assert error(plain, CHAT, {"messages": HI, "prompt_logprobs": 1, "stream": True}) == {
        "message": "`prompt_logprobs` are not available when `stream=True`.", "type": "BadRequestError",
        "param": "prompt_logprobs", "code": 400}


# ---- truncate_prompt_tokens ----


def test_truncate_prompt_tokens_keeps_a_side(plain: httpx.Client, stories_tokenizer: Any) -> None:
    ids = stories_tokenizer.encode("Once upon a time, there was a little girl", add_special_tokens=False)[:8]

    def kept(**fields: Any) -> list[int]:
        body = plain.post(COMPLETIONS, json={"prompt": ids, "max_tokens": 1, "return_token_ids": True, **fields})
        choice = body.json()["choices"][0]
        assert body.json()["usage"]["prompt_tokens"] == len(choice["prompt_token_ids"])
        return choice["prompt_token_ids"]

    assert kept(truncate_prompt_tokens=4) == ids[:4]  # the tokenizer's side: right
    assert kept(truncate_prompt_tokens=4, truncation_side="left") == ids[4:]
    assert kept(truncate_prompt_tokens=-1) == ids
    chat = plain.post(CHAT, json={"messages": HI, "max_tokens": 1, "truncate_prompt_tokens": 2,
                                  "truncation_side": "left"}).json()
    assert chat["usage"]["prompt_tokens"] == 2
    too_many = error(plain, COMPLETIONS, {"prompt": ids, "truncate_prompt_tokens": 513})
    assert too_many["param"] == "truncate_prompt_tokens" and too_many["message"] == (
        "truncate_prompt_tokens=513 cannot be greater than max_model_len = 512. Please request a smaller "
        "truncation size.")
    assert error(plain, CHAT, {"messages": HI, "truncate_prompt_tokens": -2})["param"] == "truncate_prompt_tokens"
    assert error(plain, COMPLETIONS, {"prompt": ids, "truncate_prompt_tokens": 2, "truncation_side": "middle"}
                 )["param"] == "truncation_side"


# ---- logprobs: token ids as names, -1, logprob_token_ids ----


def test_return_tokens_as_token_ids_by_flag_or_request(flagged: httpx.Client, plain: httpx.Client) -> None:
    lp = flagged.post(COMPLETIONS, json={"prompt": "Lily", "max_tokens": 2, "logprobs": 1}).json()["choices"][0][
        "logprobs"]
    assert all(t.startswith("token_id:") for t in lp["tokens"]) and all(
        k.startswith("token_id:") for top in lp["top_logprobs"] for k in top)
    off = flagged.post(COMPLETIONS, json={"prompt": "Lily", "max_tokens": 2, "logprobs": 1,
                                          "return_tokens_as_token_ids": False}).json()
    assert not any(t.startswith("token_id:") for t in off["choices"][0]["logprobs"]["tokens"])
    content = plain.post(CHAT, json={"messages": HI, "max_tokens": 2, "logprobs": True, "top_logprobs": 1,
                                     "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]["content"]
    assert all(c["token"].startswith("token_id:") and c["bytes"] == list(c["token"].encode()) for c in content)


@pytest.mark.parametrize(("path", "body", "param", "message"), [
    (COMPLETIONS, {"prompt": "a", "logprobs": -2}, "logprobs", "`logprobs` must be a positive value or -1."),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": -2}, "top_logprobs",
     "`top_logprobs` must be a positive value or -1."),
    (CHAT, {"messages": HI, "top_logprobs": 2}, "top_logprobs",
     "when using `top_logprobs`, `logprobs` must be set to true."),
    (COMPLETIONS, {"prompt": "a", "logprob_token_ids": [5]}, "logprob_token_ids",
     "when using `logprob_token_ids`, `logprobs` must be set."),
    (CHAT, {"messages": HI, "logprob_token_ids": [5]}, "logprob_token_ids",
     "when using `logprob_token_ids`, `logprobs` must be set to true."),
    (COMPLETIONS, {"prompt": "a", "prompt_logprobs": -3}, "prompt_logprobs",
     "`prompt_logprobs` must be a positive value or -1."),
])
def test_logprobs_fields_are_checked_as_vllm_does(plain: httpx.Client, path: str, body: dict[str, Any], param: str,
                                                  message: str) -> None:
    assert error(plain, path, body) | {"message": message, "param": param} == error(plain, path, body)


def test_minus_one_logprobs_pass_parsing_to_the_max_logprobs_limit(plain: httpx.Client) -> None:
    """-1 is the whole vocabulary (512 here), over the default --max-logprobs 20."""
    for path, body, param in ((COMPLETIONS, {"prompt": "a", "logprobs": -1}, "logprobs"),
                              (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": -1}, "top_logprobs")):
        err = error(plain, path, body)
        assert err["param"] == param and err["message"].startswith("Requested sample logprobs of 512, which is")


def test_minus_one_logprobs_are_the_whole_vocabulary_under_max_logprobs_minus_one(flagged: httpx.Client) -> None:
    """Every one of the 512 tokens, each named by its id (--return-tokens-as-token-ids keeps the names apart)."""
    body = {"prompt": "Lily", "max_tokens": 2, "logprobs": -1, "echo": True}
    choice = flagged.post(COMPLETIONS, json=body).json()["choices"][0]
    assert all(len(top) == 512 for top in choice["logprobs"]["top_logprobs"][1:])
    assert all(len(position) == 512 for position in choice["prompt_logprobs"][1:])  # echo's: at `logprobs`
    chat = flagged.post(CHAT, json={"messages": HI, "max_tokens": 2, "logprobs": True, "top_logprobs": -1}).json()
    assert [len(item["top_logprobs"]) for item in chat["choices"][0]["logprobs"]["content"]] == [512, 512]


def test_logprob_token_ids_give_the_sampled_token_and_those_ids(plain: httpx.Client, stories_tokenizer: Any) -> None:
    listed = [7, 300]
    names = {stories_tokenizer.decode([t]) for t in listed}
    body = {"prompt": "Lily", "max_tokens": 3, "logprobs": 0, "logprob_token_ids": listed, "temperature": 0}
    lp = plain.post(COMPLETIONS, json=body).json()["choices"][0]["logprobs"]
    for token, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        assert set(top) == names | {token}  # all of them, not `logprobs` + 1
    chat = plain.post(CHAT, json={"messages": HI, "max_tokens": 3, "logprobs": True, "logprob_token_ids": listed,
                                  "return_tokens_as_token_ids": True}).json()
    for item in chat["choices"][0]["logprobs"]["content"]:
        expected = dict.fromkeys([item["token"]] + [f"token_id:{t}" for t in listed])  # the sampled one first
        assert [t["token"] for t in item["top_logprobs"]] == list(expected)
