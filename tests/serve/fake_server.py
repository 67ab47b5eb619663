"""`python -m tests.serve.fake_server [flags]`: the real `jaxllm.serve.run_server` (flags, signals, exit
status) over a FakeModelRunner engine (in a child process as the real server's, or on a thread with
--disable-frontend-multiprocessing), for the subprocess tests. Each step takes
$FAKE_STEP_S seconds; $FAKE_FAIL_AT_STEP makes the engine die at that step."""

from __future__ import annotations

import functools
import logging
import os
import sys

from jaxllm.engine.engine_process import ProcessEngine
from jaxllm.serve import make_context, parse_args, run_server
from jaxllm.tokenizer import load_tokenizer
from tests.serve.fake_engine import STORIES, STORY, new_engine, story_engine_parts


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, args = parse_args(sys.argv[1:])
    fail = os.environ.get("FAKE_FAIL_AT_STEP")
    options = {"delay_s": float(os.environ.get("FAKE_STEP_S", "0.02")), "fail_at_step": int(fail) if fail else None}
    if args.disable_frontend_multiprocessing:
        tokenizer = load_tokenizer(STORIES)
        engine = new_engine(tokenizer, tokenizer.encode(" " + STORY, add_special_tokens=False), **options)
    else:  # as `python -m jaxllm.serve` runs it: the engine loop in a child process
        engine = ProcessEngine(functools.partial(story_engine_parts, **options))
    return run_server(make_context(engine, args))


if __name__ == "__main__":
    sys.exit(main())
