"""The OpenAI-compatible HTTP layer (Starlette). Never imports jax.

Data flow of one request:

    JSON body -> `protocol` (pydantic models, vLLM's field names and defaults)
      -> `prompts` (chat template / tokenize, context-length checks) -> `tool_choice` (tools, forced calls)
         and `structured` (the grammar, checked by compiling) -> `sampling` (SamplingParams, model defaults
         for unset fields)
      -> `AsyncEngine.generate(...)` (delta `RequestOutput`s) -> `completions` / `chat` (vLLM-shaped JSON
         or SSE chunks through `streaming`; chat output through `output_parsing`: `reasoning_parsers`, then
         `tool_parsers`).

`app.build_app(...)` wires the routes, CORS, auth, the body-size limit and `/metrics` (`prometheus_metrics`).
The engine is reached only through the small interface in `engine_client.EngineClient`.
"""
