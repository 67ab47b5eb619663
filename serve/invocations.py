"""POST /invocations, SageMaker's one route: a chat or a completion request, told apart by its body's shape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from serve.chat import create_chat_completion
from serve.completions import create_completion
from serve.errors import APIError

if TYPE_CHECKING:
    from serve.app import ServingContext


async def create_invocation(ctx: ServingContext, raw: Request, body: Any) -> Response:
    """A body with `messages` is a chat request, one with `prompt` (or `prompt_embeds`) a completion request,
    as vLLM 0.34 tries them in that order; the chosen endpoint's own errors name what is wrong with it."""
    if isinstance(body, dict) and "messages" in body:
        return await create_chat_completion(ctx, raw, body)
    if isinstance(body, dict) and ("prompt" in body or "prompt_embeds" in body):
        return await create_completion(ctx, raw, body)
    raise APIError("Cannot find suitable handler for request. Expected one of: "
                   "['ChatCompletionRequest', 'CompletionRequest']")
