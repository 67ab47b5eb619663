"""Write tests/golden/stories260K_greedy.json: the reference greedy output of the embedded stories260K.

It runs transformers + torch on CPU, with greedy decoding from BOS `[1]`, at most 256 new tokens,
and stops at the generation config's EOS ids `[2, 1]`. It records the token ids, each chosen
token's log-probability, the decoded text, and how the file was made.

    .venv/bin/python scripts/make_golden_stories.py [--out tests/golden/stories260K_greedy.json]

It checks the text against the opening that Karpathy documents for stories260K (llama2.c
doc/stories260K.md, quoted in /work/shared/fixtures/README.md), and exits non-zero when it differs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "jaxllm" / "data" / "stories260K"
DEFAULT_OUT = REPO / "tests" / "golden" / "stories260K_greedy.json"
PROMPT_TOKEN_IDS = [1]  # BOS
MAX_NEW_TOKENS = 256
EXPECTED_OPENING = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)


TOP_K = 5  # alternatives stored per step, for check_logprobs_close-style comparisons


def greedy(model: torch.nn.Module, eos_token_ids: list[int]) -> tuple[list[int], list[float], list[list], str]:
    """(new token ids, their log-probabilities, the top-k [id, logprob] pairs per step, finish reason)
    of greedy generation from BOS."""
    out = model.generate(
        torch.tensor([PROMPT_TOKEN_IDS]),
        attention_mask=torch.ones(1, len(PROMPT_TOKEN_IDS), dtype=torch.long),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        eos_token_id=eos_token_ids,
        pad_token_id=eos_token_ids[0],
        output_logits=True,
        return_dict_in_generate=True,
    )
    token_ids = out.sequences[0, len(PROMPT_TOKEN_IDS):].tolist()
    # out.logits: one (1, vocab) tensor per generated token
    step_logprobs = [torch.log_softmax(step[0].double(), dim=-1) for step in out.logits]  # each (vocab,)
    logprobs = [lp[t].item() for lp, t in zip(step_logprobs, token_ids, strict=True)]
    top = [torch.topk(lp, TOP_K) for lp in step_logprobs]
    top_logprobs = [[[i, round(v, 6)] for v, i in zip(t.values.tolist(), t.indices.tolist(), strict=True)] for t in top]
    finish_reason = "stop" if token_ids and token_ids[-1] in eos_token_ids else "length"
    return token_ids, logprobs, top_logprobs, finish_reason


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    eos_token_ids = list(GenerationConfig.from_pretrained(MODEL_DIR).eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    with torch.no_grad():
        token_ids, logprobs, top_logprobs, finish_reason = greedy(model, eos_token_ids)
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if not text.startswith(EXPECTED_OPENING):
        print(f"golden text does not start with Karpathy's sample:\n{text[:300]!r}", file=sys.stderr)
        return 1

    golden = {
        "model": "jaxllm/data/stories260K",
        "prompt_token_ids": PROMPT_TOKEN_IDS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_ids": eos_token_ids,
        "finish_reason": finish_reason,
        "num_output_tokens": len(token_ids),
        # Every new token, the final EOS included when finish_reason is "stop" (as vLLM's token_ids).
        "output_token_ids": token_ids,
        # log_softmax (float32 logits, taken in float64) of each chosen token; rounded to 1e-6.
        "output_logprobs": [round(lp, 6) for lp in logprobs],
        # The top-5 [token id, logprob] of each step, best first (near-ties show where greedy may flip).
        "output_top_logprobs": top_logprobs,
        # tokenizer.decode(output_token_ids, skip_special_tokens=True)
        "text": text,
        "how_it_was_made": {
            "command": "python scripts/make_golden_stories.py",
            "method": "transformers AutoModelForCausalLM.generate, greedy (do_sample=False), float32, CPU",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One key per line, each value on its line: readable diffs without one line per token id.
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in golden.items()]
    args.out.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(token_ids)} tokens, finish_reason={finish_reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
