"""The engine, the HTTP layer and the package's light exports import with jax unimportable."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys
class BlockJax:
    def find_spec(self, name, path=None, target=None):
        if name == "jax" or name.startswith(("jax.", "jaxlib", "flax")):
            raise ImportError(f"jax is blocked in this test: {name}")
        return None
sys.meta_path.insert(0, BlockJax())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=120)


def test_engine_and_serve_import_without_jax():
    result = _run(
        "import jaxllm, jaxllm.engine, serve, jaxllm.config, jaxllm.sampling_params, jaxllm.outputs\n"
        "import jaxllm.engine.interfaces, jaxllm.engine.metrics, jaxllm.model_arch\n"
        "from jaxllm import SamplingParams, RequestOutput\n"
        "import pkgutil, importlib\n"
        "for pkg in (jaxllm.engine, serve):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax was imported'\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_the_blocker_really_blocks():
    result = _run("import jax\n")
    assert result.returncode != 0 and "jax is blocked" in result.stderr
