"""A POST's JSON body, read as every endpoint reads it: vLLM's content type, the request bounds
(`serve.request_bounds`: before parsing and after), and the parser's own limits, each a 400."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any

from starlette.requests import Request

from serve.errors import APIError
from serve.request_bounds import RequestBounds, check_parsed, needs_walk, prescan

# vLLM's validate_json_request: its RequestValidationError's message and `type`.
_NOT_JSON_MEDIA_TYPE = "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"
# A \uD800-\uDFFF escape: json.loads leaves an unpaired one in the string, which the tokenizer cannot encode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Deeper bodies parse but blow the recursion limit later (the chat template's data walk, deepcopy).
_MAX_DEPTH = 128
_TOO_DEEP = f"The request body is nested too deeply (more than {_MAX_DEPTH} levels of arrays and objects)."
# Bodies up to this size that need no pre-scan walk parse on the event loop (about a millisecond); others on a
# worker thread, where a long walk yields the GIL to the loop.
_INLINE_PARSE_BYTES = 256 * 1024


async def read_json(request: Request, bounds: RequestBounds) -> Any:
    check_media_type(request.headers.get("content-type", ""))
    body = await _body(request)
    if len(body) <= _INLINE_PARSE_BYTES and not needs_walk(body, bounds):
        return parse_body(body, bounds)
    return await asyncio.to_thread(parse_body, body, bounds)


async def _body(request: Request) -> bytes:
    """The body without a copy when it comes in one piece (as `BufferedBody` hands it on); starlette's
    `Request.body()` joins it with its empty end marker, a second copy of up to --max-request-body-bytes."""
    chunks = [chunk async for chunk in request.stream() if chunk]
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_media_type(content_type: str) -> None:
    """vLLM's rule, to the letter: the media type before any `;` parameters is application/json."""
    if content_type.lower().split(";", maxsplit=1)[0] != "application/json":
        raise APIError(_NOT_JSON_MEDIA_TYPE, type="Bad Request")


def parse_body(body: bytes, bounds: RequestBounds) -> Any:
    prescan(body, bounds)
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"The request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise APIError(_TOO_DEEP) from e
    except ValueError as e:  # an integer literal past Python's int-conversion limit
        raise APIError(f"The request body holds an integer literal of more than {sys.get_int_max_str_digits()} "
                       "digits.") from e
    if body.count(b"[") + body.count(b"{") > _MAX_DEPTH and _deeper_than(value, _MAX_DEPTH):
        raise APIError(_TOO_DEEP)
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError as e:
            raise APIError("The request body is not valid JSON: it holds an unpaired UTF-16 surrogate escape "
                           f"({e.object[e.start:e.end].encode('unicode_escape').decode()}), which is not a "
                           "character.") from e
    check_parsed(value, bounds)
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (iteratively: no recursion limit here)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False
