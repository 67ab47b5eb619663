"""OpenAI / vLLM request fields -> `StructuredOutputsParams`, as vLLM reads them.

- `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`, or
  `{"type": "structural_tag", ...}` (vLLM's extension; the whole object is the tag).
- `structured_outputs` (vLLM's extra field): `{"json" | "regex" | "choice" | "grammar" | "json_object" |
  "structural_tag": ...}` plus vLLM's backend options, which are accepted and ignored.
Both may be given when they set the same single kind; two kinds are an error (vLLM's rule).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxllm.sampling_params import StructuredOutputsParams

_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(StructuredOutputsParams))
# vLLM's per-request options of its structured-output backends, which its 0.34.0 backends ignore too: they read
# the engine's --structured-outputs-config (`compile_grammar`'s options).
_IGNORED_OPTIONS = frozenset({"disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                              "whitespace_pattern", "backend", "_backend", "_backend_was_auto"})


def structured_outputs_from_request(
    response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None
) -> StructuredOutputsParams | None:
    """The spec a chat/completions request asks for, or None. Raises ValueError for a malformed one."""
    fields: dict[str, Any] = {}
    if structured_outputs:
        unknown = set(structured_outputs) - set(_SPEC_FIELDS) - _IGNORED_OPTIONS
        if unknown:
            raise ValueError(f"structured_outputs has unknown fields {sorted(unknown)}; "
                             f"expected one of {list(_SPEC_FIELDS)}")
        fields = {k: v for k, v in structured_outputs.items() if k in _SPEC_FIELDS and v not in (None, False)}
    if response_format:
        kind = response_format.get("type")
        if kind == "json_object":
            fields["json_object"] = True
        elif kind == "json_schema":
            json_schema = response_format.get("json_schema")
            if not isinstance(json_schema, dict) or "schema" not in json_schema:
                raise ValueError("response_format of type json_schema needs json_schema.schema")
            fields["json"] = json_schema["schema"]
        elif kind == "structural_tag":
            fields["structural_tag"] = json.dumps(response_format)
        elif kind != "text":
            raise ValueError(f"response_format type must be one of text, json_object, json_schema, structural_tag; "
                             f"got {kind!r}")
    if not fields:
        return None
    if len(fields) > 1:
        raise ValueError(f"You can only use one kind of structured outputs, got {sorted(fields)}")
    return StructuredOutputsParams(**fields)
