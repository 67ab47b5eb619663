"""The engine, the HTTP layer, the server entry point and the package's light exports import with jax
unimportable (tests/engine/test_no_jax.py also runs the engine that way)."""

from __future__ import annotations

import subprocess
import sys

from tests.jax_blocker import BLOCK_JAX


def _run(code: str, *, block_jax: bool = True) -> subprocess.CompletedProcess:
    prelude = BLOCK_JAX if block_jax else ""
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)


def _assert_runs(code: str, *, block_jax: bool = True) -> None:
    """`code` (which prints "ok" last) runs to its end in a fresh interpreter."""
    result = _run(code, block_jax=block_jax)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_engine_and_serve_import_without_jax():
    _assert_runs(
        "import jaxllm, jaxllm.engine, serve, jaxllm.config, jaxllm.sampling_params, jaxllm.outputs\n"
        "import jaxllm.engine.interfaces, jaxllm.engine.metrics, jaxllm.model_arch, jaxllm.serve, jaxllm.cli\n"
        "import jaxllm.serving, jaxllm.validation, jaxllm.runner.limits\n"
        "from jaxllm import SamplingParams, RequestOutput\n"
        "import pkgutil, importlib\n"
        "for pkg in (jaxllm.engine, serve):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax was imported'\n"
        "print('ok')\n"
    )


def test_the_blocker_really_blocks():
    result = _run("import jax\n")
    assert result.returncode != 0 and "jax is blocked here" in result.stderr


def test_server_entry_point_imports_no_transformers():
    """`python -m jaxllm.serve` starts the engine process before it loads the HTTP stack: its own
    import (and the engine process's re-import of it as __main__) stays light."""
    _assert_runs(
        "import sys, jaxllm.serve, jaxllm.serving\n"
        "heavy = [m for m in ('transformers', 'torch', 'jax', 'serve.app') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n", block_jax=False)


def test_loading_a_tokenizer_and_generation_defaults_imports_no_torch():
    """The engine process and the HTTP process need transformers' tokenizers and generation config only;
    torch (pulled in by AutoTokenizer and AutoConfig) costs each of them seconds of start-up."""
    _assert_runs(
        "import sys\n"
        "from jaxllm.config import DEFAULT_MODEL\n"
        "from jaxllm.generation_config import load_generation_defaults\n"
        "from jaxllm.tokenizer import load_tokenizer\n"
        "from tests.fixtures import fixture_tokenizer\n"
        "assert load_generation_defaults(DEFAULT_MODEL).eos_token_ids == [2, 1]\n"
        "for path in (DEFAULT_MODEL, fixture_tokenizer('qwen2.5')):\n"
        "    assert load_tokenizer(path).is_fast\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n", block_jax=False)
