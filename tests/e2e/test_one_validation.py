"""Requests are validated once, by one function: an invalid request gets the same message from the offline
`LLM` and from the server over the same engine (stories260K), and the server says it before any 200."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.validation import ValidationError
from serve.app import ServingContext
from serve.args import ServerArgs
from tests.e2e.conftest import assert_pool_free
from tests.serve.conftest import LiveServer

# (prompt token ids, sampling fields as both APIs spell them, the field the error names)
INVALID = [
    ([1] * 600, {"max_tokens": 8}, "input_tokens"),
    ([1, 300, 99999], {"max_tokens": 8}, "prompt"),
    ([1, 300], {"max_tokens": 8, "logprobs": 21}, "logprobs"),
    ([1, 300], {"max_tokens": 8, "stop_token_ids": [70000]}, "stop_token_ids"),
    ([1, 300], {"max_tokens": 8, "top_p": 0.0}, "top_p"),
    ([1, 300], {"max_tokens": 8, "temperature": -1.0}, "temperature"),
]


@pytest.fixture(scope="module")
def server(llm: LLM) -> Any:
    with LiveServer(ServingContext(engine=AsyncEngine(llm.engine), args=ServerArgs())) as live:
        yield live


@pytest.mark.parametrize(("prompt", "fields", "param"), INVALID)
def test_the_offline_api_and_the_server_give_the_same_message(llm: LLM, server: LiveServer, prompt: list[int],
                                                              fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as offline:
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(**fields), use_tqdm=False)
    assert offline.value.param == param
    body = {"prompt": prompt, **fields}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        plain = http.post("/v1/completions", json=body)
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            streamed.read()
    for response in (plain, streamed):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["message"], error["param"]) == (str(offline.value), param)
    assert_pool_free(llm)
