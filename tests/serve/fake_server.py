"""`python -m tests.serve.fake_server [flags]`: the real `jaxllm.serve.run_server` (flags, signals, exit
status) over an AsyncEngine + FakeModelRunner, for the subprocess tests. Each step takes
$FAKE_STEP_S seconds; $FAKE_FAIL_AT_STEP makes the engine die at that step."""

from __future__ import annotations

import logging
import os
import sys

from jaxllm.generation_config import load_generation_defaults
from jaxllm.serve import make_context, parse_args, run_server
from jaxllm.tokenizer import load_tokenizer
from tests.serve.fake_engine import STORIES, STORY, new_engine


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, args = parse_args(sys.argv[1:])
    tokenizer = load_tokenizer(STORIES)
    fail = os.environ.get("FAKE_FAIL_AT_STEP")
    engine = new_engine(tokenizer, tokenizer.encode(" " + STORY, add_special_tokens=False),
                        delay_s=float(os.environ.get("FAKE_STEP_S", "0.02")), fail_at_step=int(fail) if fail else None)
    defaults = load_generation_defaults(STORIES)
    return run_server(make_context(engine, config, args, default_sampling=defaults.sampling, chat_template=None))


if __name__ == "__main__":
    sys.exit(main())
