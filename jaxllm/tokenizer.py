"""Tokenizer loading and chat-prompt rendering, the way vLLM does it (no jax here).

Data flow of a chat request: OpenAI-style messages -> `apply_chat_template` (text, with the
template's own BOS and role markers) -> `encode_prompt(..., add_special_tokens=False)` -> ids.
A completion prompt is plain text -> `encode_prompt(..., add_special_tokens=True)` -> ids, so the
tokenizer's post-processor adds BOS. These are vLLM's defaults for the two APIs (the chat request
field `add_special_tokens` defaults to False, the completion one to True).

Jinja is never reimplemented: rendering is transformers' `apply_chat_template(..., tokenize=False)`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.nodes
import transformers
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

ContentFormat = Literal["string", "openai"]

# Characters that mark a --chat-template value as inline Jinja rather than a path (vLLM's rule).
_JINJA_CHARS = "{}\n"


def load_tokenizer(path_or_id: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The fast (Rust `tokenizers`) tokenizer of a model directory, or of a model id in the local HF cache.

    Never touches the network (`local_files_only=True`) and never runs remote code.

    NOTE: the class tokenizer_config.json names is loaded directly when transformers has it: AutoTokenizer
    imports the model configurations, and through them torch, which the engine and the HTTP process
    otherwise never need (seconds of each one's start-up).
    """
    directory = _local_directory(path_or_id, revision)
    tokenizer_class = _named_tokenizer_class(directory) if directory is not None else None
    if tokenizer_class is None:
        from transformers.models.auto.tokenization_auto import AutoTokenizer  # noqa: PLC0415

        tokenizer_class = AutoTokenizer
    try:
        tokenizer = tokenizer_class.from_pretrained(
            str(directory or path_or_id), revision=revision, local_files_only=True, trust_remote_code=False
        )
    except OSError as e:
        raise ValueError(
            f"could not load a tokenizer from {str(path_or_id)!r} (a model directory, or a model id already "
            f"in the local Hugging Face cache; jaxllm does not download): {e}"
        ) from e
    if not tokenizer.is_fast:
        raise ValueError(f"{str(path_or_id)!r} has no fast tokenizer (tokenizer.json); jaxllm needs one")
    return tokenizer


def _local_directory(path_or_id: str | Path, revision: str | None) -> Path | None:
    """The directory of a model path, or of a model id's snapshot in the local HF cache; None if neither."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        return Path(snapshot_download(str(path_or_id), revision=revision, local_files_only=True))
    except Exception:  # the hub raises several types for "not in cache"; AutoTokenizer reports it
        return None


def _named_tokenizer_class(directory: Path) -> type[PreTrainedTokenizerBase] | None:
    """The tokenizer class tokenizer_config.json names (or its name without "Fast"), if transformers has it."""
    try:
        name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    if not isinstance(name, str):
        return None
    for candidate in dict.fromkeys((name, name.removesuffix("Fast"))):
        try:
            found = getattr(transformers, candidate)
        except (AttributeError, ImportError):
            continue
        if isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase):
            return found
    return None


def resolve_chat_template(value: str | Path | None) -> str | None:
    """The `--chat-template` flag: a path to a Jinja file, or the Jinja text itself.

    Like vLLM's `load_chat_template`: a value that cannot be opened is taken as inline Jinja when it
    contains `{`, `}` or a newline, and escapes in it (`\\n` typed on a shell line) are interpreted;
    otherwise it looks like a mistyped path and is an error.
    """
    if value is None:
        return None
    try:
        return Path(value).read_text(encoding="utf-8")
    except OSError as e:
        if isinstance(value, Path) or not any(c in value for c in _JINJA_CHARS):
            raise ValueError(
                f"The supplied chat template ({value}) looks like a file path, but it failed to be opened. "
                f"Reason: {e}"
            ) from e
    # NOTE: vLLM runs `codecs.decode(value, "unicode_escape")`, which turns any non-ASCII text into
    # mojibake ("é" -> "Ã©"). Escaping non-Latin-1 characters first and encoding as Latin-1 keeps
    # them intact while still interpreting `\n`, `\t` and `\uXXXX`.
    if "\\" not in value:
        return value
    return value.encode("latin-1", "backslashreplace").decode("unicode_escape")


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text of an OpenAI-style conversation, exactly as transformers renders it.

    `chat_template` (already resolved text) overrides the tokenizer's. Message content given as a
    list of parts is joined with "\\n" for templates that read `content` as a string and passed as a
    list of `{"type": "text", "text": ...}` to templates that loop over it (vLLM's "auto" content
    format). Only text parts are accepted. Assistant tool calls fed back with JSON-text `arguments`
    are parsed first: templates (Qwen2.5's `tojson`, Llama 3's, Hermes') expect objects, and vLLM
    parses them too. Tokenize the result with `add_special_tokens=False`.
    """
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError(
            f"The tokenizer of {tokenizer.name_or_path!r} has no chat template; pass --chat-template (a Jinja "
            "file or inline text) or use the completions API. As of transformers v4.44, default chat template "
            "is no longer allowed, so you must provide a chat template if the tokenizer does not define one."
        )
    if add_generation_prompt and continue_final_message:
        raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    template = tokenizer.get_chat_template(chat_template, tools)
    content_format = detect_content_format(template)
    conversation = [_normalize_message(m, content_format) for m in tool_call_arguments_as_objects(messages)]
    return tokenizer.apply_chat_template(
        conversation,
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tokenize=False,
        **(chat_template_kwargs or {}),
    )


def starts_with_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether `text` (a rendered chat prompt) already begins with the tokenizer's BOS token."""
    return tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool) -> list[int]:
    """Token ids of a prompt: `add_special_tokens=False` for rendered chat prompts (the template
    wrote BOS; adding another gives a double BOS), True for completion prompts (vLLM's defaults)."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _normalize_message(message: dict[str, Any], content_format: ContentFormat) -> dict[str, Any]:
    """A copy of `message` whose `content` has the shape the template expects."""
    out = dict(message)
    content = message.get("content")
    # NOTE: None content (an assistant turn holding only tool_calls) becomes "" / [], as in vLLM.
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    texts = [_part_text(part) for part in parts]
    if content_format == "openai":
        out["content"] = [{"type": "text", "text": t} for t in texts]
    else:
        out["content"] = "\n".join(texts)
    return out


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise ValueError(f"Unsupported content part type {kind!r}: this model accepts text parts only.")


@lru_cache(maxsize=32)
def detect_content_format(chat_template: str) -> ContentFormat:
    """"openai" when the template loops over a message's `content` (a list of parts), else "string".

    A compact form of vLLM's Jinja-AST check: find the names bound to messages (`messages`, names set
    from it, the targets of loops over them), then look for a loop over `<message>['content']`,
    `<message>.content` or a bare `content` variable.
    """
    try:
        ast = jinja2.Environment().parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return "string"  # transformers will report the syntax error when rendering
    messages_names = _names_bound_to(ast, {"messages"})
    message_names = {
        loop.target.name
        for loop in ast.find_all(jinja2.nodes.For)
        if isinstance(loop.target, jinja2.nodes.Name) and _base_name(loop.iter) in messages_names
    }
    for loop in ast.find_all(jinja2.nodes.For):
        node = _strip_filters(loop.iter)
        if isinstance(node, jinja2.nodes.Name) and node.name == "content":
            return "openai"
        if _is_key_access(node, "content") and _base_name(node.node) in message_names:
            return "openai"
    return "string"


def _names_bound_to(ast: jinja2.nodes.Template, roots: set[str]) -> set[str]:
    """`roots` plus every name `{% set x = <root>... %}` binds, followed transitively."""
    names = set(roots)
    assigns = [a for a in ast.find_all(jinja2.nodes.Assign) if isinstance(a.target, jinja2.nodes.Name)]
    changed = True
    while changed:
        changed = False
        for assign in assigns:
            if assign.target.name not in names and _base_name(assign.node) in names:
                names.add(assign.target.name)
                changed = True
    return names


def _strip_filters(node: jinja2.nodes.Node) -> jinja2.nodes.Node:
    while isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test) and node.node is not None:
        node = node.node
    return node


def _is_key_access(node: jinja2.nodes.Node, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == key
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
    return False


def _base_name(node: jinja2.nodes.Node) -> str | None:
    """The variable an expression like `messages[1:] | reverse` or `loop_messages` starts from."""
    node = _strip_filters(node)
    while isinstance(node, jinja2.nodes.Getitem | jinja2.nodes.Getattr):
        node = _strip_filters(node.node)
    return node.name if isinstance(node, jinja2.nodes.Name) else None


def tool_call_arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of `messages` in which every assistant tool call's JSON-text `arguments` is parsed
    (None or "" becomes {}); other messages are shared, not copied. ValueError for arguments that are
    not JSON."""
    out = []
    for index, message in enumerate(messages):
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not isinstance(calls, list):
            out.append(message)
            continue
        parsed_calls = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                parsed_calls.append(call)
                continue
            arguments = function.get("arguments")
            if not arguments:
                arguments = {}
            elif isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as e:
                    raise ValueError(f"messages[{index}]: the arguments of tool call {call.get('id')!r} are not "
                                     f"valid JSON: {e}") from e
            parsed_calls.append({**call, "function": {**function, "arguments": arguments}})
        out.append({**message, "tool_calls": parsed_calls})
    return out
