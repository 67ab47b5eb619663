"""Errors as vLLM's `{"error": {"message", "type", "param", "code"}}` with the HTTP status as `code`."""

from __future__ import annotations

import dataclasses
import json
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from jaxllm.sampling_params import SamplingParams
from serve.protocol import FieldError

# vLLM's `type` per status; others fall back to the status phrase without spaces + "Error".
_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "RequestTooLargeError",
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
    HTTPStatus.NOT_IMPLEMENTED: "NotImplementedError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
}

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


class APIError(Exception):
    """Raised anywhere in a handler; the app turns it into the error JSON."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, *, param: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = HTTPStatus(status)
        self.param = param
        self.type = type or _ERROR_TYPES.get(self.status, self.status.phrase.replace(" ", "") + "Error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status.value}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status.value)

    def sse_event(self) -> str:
        return f"data: {json.dumps(self.body(), ensure_ascii=False, separators=(',', ':'))}\n\n"


def from_validation_error(err: ValidationError) -> APIError:
    """A 400 naming the first offending field (its top-level name is `param`)."""
    errors = err.errors(include_url=False)
    for e in errors:
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            return APIError(str(cause), param=cause.param)
    first_field = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
    details = []
    for e in errors:
        if e["loc"] and str(e["loc"][0]) != first_field:
            continue
        where = ".".join(str(part) for part in e["loc"]) or "body"
        details.append(f"{where}: {e['msg']}")
    message = f"Invalid value for `{first_field}`: " + "; ".join(dict.fromkeys(details)) if first_field else str(err)
    return APIError(message, param=first_field)


def from_sampling_error(err: ValueError) -> APIError:
    """`SamplingParams(...)` raises ValueError("<field> must ..."): a 400 with that field as `param`."""
    message = str(err)
    words = message.split(maxsplit=1)
    param = words[0] if words and words[0] in _SAMPLING_FIELDS else None
    return APIError(message, param=param)


def not_supported(feature: str, param: str) -> APIError:
    return APIError(f"{feature} is not supported yet by jaxllm.", param=param)
