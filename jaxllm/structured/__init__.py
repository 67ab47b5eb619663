"""Structured outputs on the host: grammars compiled from vLLM's `structured_outputs`, per-request matchers
that write packed allowed-token bitmasks, and the JSON schemas behind `tool_choice="required"` / named tools.

Data flow: the server turns `response_format` / `structured_outputs` (`structured_outputs_from_request`)
or `tool_choice` (`tool_choice_constraint`) into a `StructuredOutputsParams` and calls
`compile_grammar(spec, tokenizer, vocab_size)` on a worker thread (a bad spec raises `ValueError`, which the
server answers with a 400 before its response starts). The engine process compiles it again, on its own
thread pool (`jaxllm.engine.core.GrammarCompiles`; `make_grammar_compiler(tokenizer, vocab_size)` is the
`grammar_compiler` `LLMEngine` takes), and holds that request back in the scheduler until it is ready; each
of its sequences then gets `compiled.new_matcher()`. For every step where such a request samples, once the
previous step's tokens are accepted and while
this step's forward runs on the device, it calls `matcher.fill_bitmask(row)` into the request's row of
`SchedulerOutput.grammar_bitmask` (`Scheduler.grammar_bitmask`); the runner then masks the logits on
device (the reference is `apply_bitmask_numpy`), and every sampled token goes back through
`matcher.accept_token`. Constrained batches keep async scheduling.

NOTE: the grammar engine is llguidance (PyPI `llguidance`), chosen over xgrammar and outlines-core:
- wheels: one `cp39-abi3` wheel per platform with no Python dependencies (manylinux_2_31 x86_64 serves both
  Python 3.11 here and 3.12 on the GPU image); xgrammar's wheel requires torch, triton, transformers,
  pydantic and apache-tvm-ffi, heavy to carry to an offline machine; outlines-core is light too, but
- speed: llguidance computes each mask on the fly from an Earley parser over a token trie, with no
  ahead-of-time index: a schema compiles in milliseconds and a request's matcher is a copy (bench/RESULTS.md
  has the figures). outlines-core builds a full regex index per schema up front, seconds for large
  vocabularies and schemas;
- coverage: llguidance handles JSON schema (anyOf/oneOf/allOf, $ref/$defs incl. recursion, enum/const,
  string/number/array/object bounds, formats, patterns), regular expressions, and Lark and GBNF context-free
  grammars (vLLM's `grammar` field); outlines-core has no context-free grammars. It names what it does not
  support ('Unimplemented keys: ["not"]'), which becomes our 400 message. vLLM ships it as its `guidance`
  backend.
"""

from jaxllm.structured.bitmask import allowed_token_ids, apply_bitmask_numpy, bitmask_words
from jaxllm.structured.compiler import CompiledGrammar, compile_grammar, make_grammar_compiler
from jaxllm.structured.matcher import GrammarMatcher
from jaxllm.structured.request_fields import structured_outputs_from_request
from jaxllm.structured.tool_choice import ToolChoiceConstraint, tool_choice_constraint

__all__ = [
    "CompiledGrammar",
    "GrammarMatcher",
    "ToolChoiceConstraint",
    "allowed_token_ids",
    "apply_bitmask_numpy",
    "bitmask_words",
    "compile_grammar",
    "make_grammar_compiler",
    "structured_outputs_from_request",
    "tool_choice_constraint",
]
