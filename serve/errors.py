"""Errors as vLLM's `{"error": {"message", "type", "param", "code"}}` with the HTTP status as `code`."""

from __future__ import annotations

import json
import logging
import uuid
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from jaxllm.engine.client import EngineDeadError, RequestFailedError
from jaxllm.validation import ValidationError as RequestValidationError
from serve.protocol import FieldError

logger = logging.getLogger("jaxllm.serve")

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


def from_pydantic_error(err: ValidationError) -> APIError:
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


def not_supported(feature: str, param: str) -> APIError:
    return APIError(f"{feature} is not supported yet by jaxllm.", param=param)


def generation_error(exc: BaseException, *, engine_dead: bool, params: dict[str, str] | None = None) -> APIError:
    """What a client sees of an exception from submitting or running a generation.

    A request the engine cannot serve is a 400 naming its field (`params` renames the engine's names to this
    endpoint's, e.g. max_tokens -> max_completion_tokens), and so is one the engine ended with an error (a
    grammar that did not compile). A dead engine, or anything else, is a 500 whose message carries no
    exception text (the log has it)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return APIError(exc.message, param=(params or {}).get(exc.param or "", exc.param))
    if isinstance(exc, RequestFailedError):  # the engine's grammar compile failed
        return APIError(str(exc), param=(params or {}).get("structured_outputs"))
    if engine_dead or isinstance(exc, EngineDeadError):
        return APIError("The engine died; the server is shutting down.", HTTPStatus.INTERNAL_SERVER_ERROR)
    return internal_error("Generation failed", exc)


def internal_error(what: str, exc: BaseException) -> APIError:
    """A 500 for a bug: the log has `what` and the traceback under a fresh id, the client only that id (an
    exception's text may hold paths, internals or other requests' data)."""
    error_id = uuid.uuid4().hex
    logger.error("%s (error id %s)", what, error_id, exc_info=exc)
    return APIError(f"Internal server error (error id {error_id}); the server's log has the details.",
                    HTTPStatus.INTERNAL_SERVER_ERROR)
