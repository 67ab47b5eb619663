"""POST /v1/chat/completions/batch: N conversations in one request, one choice each (index i: conversation i).

The body is a chat request whose `messages` is a list of conversations. Each conversation runs as its own
chat completion, concurrently (engine request ids `chatcmpl-{id}_{i}`, as vLLM's); the reply is one
`chat.completion` with their choices in order and their usage summed. As in vLLM 0.34: no streaming (`stream`
is ignored), no tools, no beam search, `n` 1.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.chat import create_chat_completion
from serve.errors import APIError
from serve.inputs import base_request_id

if TYPE_CHECKING:
    from serve.app import ServingContext

# Keys of the batch body that no single conversation's request gets.
_BATCH_ONLY_KEYS = ("messages", "request_id", "stream", "stream_options", "tools")
# Keys of a single reply that describe one conversation's prompt or run: null in the batch reply, as vLLM's.
_PER_CONVERSATION_KEYS = ("prompt_logprobs", "prompt_token_ids", "metrics")


async def create_batch_chat_completion(ctx: ServingContext, raw: Request, body: Any) -> Response:
    conversations = _conversations(body)
    batch_id = base_request_id(raw, body.get("request_id"))
    single = {key: value for key, value in body.items() if key not in _BATCH_ONLY_KEYS}
    conversation_raw = _without_request_id_header(raw)
    tasks = [
        asyncio.ensure_future(create_chat_completion(
            ctx, conversation_raw, {**single, "messages": messages, "request_id": f"{batch_id}_{index}"}))
        for index, messages in enumerate(conversations)
    ]
    try:
        responses = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    replies = [json.loads(bytes(response.body)) for response in responses]
    choices = [{**reply["choices"][0], "index": index} for index, reply in enumerate(replies)]
    batch = {**replies[0], "id": f"chatcmpl-{batch_id}", "choices": choices,
             "usage": _summed([reply["usage"] for reply in replies])}
    batch.update({key: None for key in _PER_CONVERSATION_KEYS if key in batch})
    return JSONResponse(batch)


def _conversations(body: Any) -> list[list[Any]]:
    """The batch's conversations, after vLLM's batch-mode checks (a 400 naming the field)."""
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.")
    conversations = body.get("messages")
    if not isinstance(conversations, list) or not conversations or not all(
            isinstance(c, list) and c for c in conversations):
        raise APIError("`messages` must be a non-empty list of conversations, each a non-empty list of messages.",
                       param="messages")
    if body.get("use_beam_search"):
        raise APIError("Batch chat completions do not support beam search. Please set `use_beam_search` to False.",
                       param="use_beam_search")
    if (n := body.get("n", 1)) is not None and n != 1:
        raise APIError("Batch chat completions do not support `n > 1`. Please set `n` to 1.", param="n")
    if body.get("tool_choice", "none") not in ("none", None):
        raise APIError('Batch chat completions do not support tools: `tool_choice` must be "none".',
                       param="tool_choice")
    return conversations


def _without_request_id_header(raw: Request) -> Request:
    """The request as each conversation's handler sees it: without X-Request-Id, so that the `request_id` of
    its body names its engine request (a header holds only latin-1 text, a body's id any text)."""
    headers = [(name, value) for name, value in raw.scope["headers"] if name.lower() != b"x-request-id"]
    return Request({**raw.scope, "headers": headers}, raw.receive)


def _summed(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """Usage objects added up field by field; a details object is null unless every one has it."""
    total: dict[str, Any] = {}
    for key, first in usages[0].items():
        values = [usage.get(key) for usage in usages]
        if isinstance(first, dict):
            total[key] = _summed(values) if all(isinstance(v, dict) for v in values) else None
        elif isinstance(first, int):
            total[key] = sum(values) if all(isinstance(v, int) for v in values) else None
        else:
            total[key] = first
    return total
