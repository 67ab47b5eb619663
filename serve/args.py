"""Server-only options (the engine's live in `jaxllm.config.EngineConfig`).

Every field has a default and a one-line doc, like the engine options: `python -m jaxllm.serve --help`
is generated from both.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxllm.config import option
from serve.reasoning_parsers import REASONING_PARSERS
from serve.tool_parsers import TOOL_PARSERS

# Read, in this order, when --api-key is not given (every key found is accepted).
API_KEY_ENVS = ("JAXLLM_API_KEY", "VLLM_API_KEY")


@dataclass(frozen=True, slots=True)
class ServerArgs:
    host: str | None = option(None, "Host name or address to listen on (default: all interfaces).")
    port: int = option(8000, "Port to listen on.")
    api_key: list[str] = option(
        [], "Require one of these bearer tokens on /v1/* (else read from $JAXLLM_API_KEY and $VLLM_API_KEY)."
    )
    allowed_origins: list[str] = option(["*"], "CORS: origins allowed to call the API from a browser.")
    allowed_methods: list[str] = option(["*"], "CORS: HTTP methods allowed from a browser.")
    allowed_headers: list[str] = option(["*"], "CORS: request headers allowed from a browser.")
    allow_credentials: bool = option(False, "CORS: allow cookies and credentials.")
    enable_log_requests: bool = option(False, "Log one line per request: id, prompt/output tokens, latency.")
    disable_log_stats: bool = option(False, "Turn off the periodic stats line (throughput, running/waiting, KV use).")
    uvicorn_log_level: str = option(
        "info", "Log level of uvicorn.", choices=("critical", "error", "warning", "info", "debug", "trace")
    )
    root_path: str | None = option(None, "ASGI root_path, when the server runs behind a path-based proxy.")
    max_request_body_bytes: int = option(32 * 1024 * 1024, "Largest request body accepted; larger ones get 413.")
    max_n_sequences: int = option(256, "Largest `n` (choices per prompt) a request may ask for (vLLM's "
                                  "$VLLM_MAX_N_SEQUENCES, 16384 there; OpenAI allows 128).")
    max_completion_prompts: int = option(1024, "Most prompts in one completions `prompt` list (vLLM's "
                                         "$VLLM_MAX_COMPLETION_PROMPTS), and conversations in one batch chat.")
    max_prompt_tokens_per_request: int = option(
        1024 * 1024, "Most prompt tokens one request may send, its prompts together (after tokenizing)."
    )
    max_stop_strings: int = option(4, "Most `stop` strings in one request (vLLM's $VLLM_MAX_STOP_STRINGS; OpenAI's).")
    max_num_bad_words: int = option(128, "Most `bad_words` in one request (vLLM's $VLLM_MAX_NUM_BAD_WORDS).")
    max_request_json_values: int = option(
        128 * 1024, "Most JSON values (arrays, objects, strings, numbers) in one request body, token ids not counted: "
        "messages, tools and schemas included."
    )
    request_body_timeout: float = option(
        60.0, "Seconds a client has to send the whole request body once its headers are in; slower gets 408."
    )
    request_header_timeout: float = option(
        60.0, "Seconds a client has to send a request's line and headers (from connecting, or from a later "
        "request's first byte); slower gets 408 and the connection is closed."
    )
    h11_max_incomplete_event_size: int = option(
        4 * 1024 * 1024, "Most bytes in a request's line and headers; more gets 400 (vLLM's name, enforced here on "
        "httptools)."
    )
    h11_max_header_count: int = option(256, "Most headers in a request; more gets 400.")
    metrics_names: str = option(
        "jaxllm", "Prefix of /metrics names: jaxllm, or vllm for vLLM's own names (existing dashboards).",
        choices=("jaxllm", "vllm"),
    )
    disable_frontend_multiprocessing: bool = option(
        False, "Run the engine loop on a thread of the HTTP process instead of in its own process (one GIL "
        "for both: slower with many streams)."
    )
    prompt_processes: int = option(
        1, "Worker processes that render chat templates and tokenize long prompts off the event loop (0: on it)."
    )
    shutdown_timeout: float = option(
        30.0, "Seconds SIGTERM waits for in-flight requests to finish before ending them (streams with an error "
        "event and [DONE], the others with 503)."
    )
    enable_auto_tool_choice: bool = option(
        False, 'Let the model decide when to call tools (tool_choice "auto", the default with tools); needs '
        "--tool-call-parser."
    )
    tool_call_parser: str | None = option(
        None, "How tool calls are read out of the model's text (the format its chat template teaches).",
        choices=tuple(TOOL_PARSERS),
    )
    uds: str | None = option(None, "Unix domain socket path to listen on; --host and --port are then unused.")
    ssl_keyfile: str | None = option(None, "TLS: the private key file (PEM).")
    ssl_certfile: str | None = option(None, "TLS: the certificate file (PEM); turns on HTTPS.")
    ssl_ca_certs: str | None = option(None, "TLS: CA certificates for verifying clients.")
    ssl_cert_reqs: int = option(0, "TLS: whether a client certificate is required (the ssl module's CERT_* value).")
    ssl_ciphers: str | None = option(None, "TLS: cipher suites for TLS 1.2 and below (default: uvicorn's).")
    enable_request_id_headers: bool = option(False, "Add an X-Request-Id header to every response.")
    enable_server_load_tracking: bool = option(False, "Count in-flight requests and serve the count on /load.")
    enable_tokenizer_info_endpoint: bool = option(
        False, "Serve /tokenizer_info (it shows the chat template and tokenizer settings)."
    )
    disable_dashboard: bool = option(False, "Turn off the live status page, /dashboard and its /dashboard/data.")
    enable_prompt_tokens_details: bool = option(False, "Add usage.prompt_tokens_details (cached prompt tokens).")
    enable_per_request_metrics: bool = option(False, "Add a per-request `metrics` object (timings) to responses.")
    enable_force_include_usage: bool = option(False, "Send usage on every response, streamed ones included.")
    return_tokens_as_token_ids: bool = option(
        False, "Write logprobs tokens as 'token_id:{id}' (tokens that are not valid UTF-8 stay identifiable)."
    )
    reasoning_parser: str | None = option(
        None, "Split the model's <think>...</think> out of the content into message.reasoning (and "
        "reasoning_content).", choices=tuple(REASONING_PARSERS),
    )

    def __post_init__(self) -> None:
        # NOTE: a lone string would be read as one key per character.
        if isinstance(self.api_key, str):
            raise TypeError("api_key is a list of keys")
