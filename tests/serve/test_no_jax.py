"""serve/ (and the server entry point's import) never imports jax."""

from __future__ import annotations

import subprocess
import sys

BLOCK_JAX = """
import sys
class BlockJax:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax"):
            raise ImportError(f"jax is blocked here: {name}")
        return None
sys.meta_path.insert(0, BlockJax())
"""


def test_serve_and_the_entry_point_import_without_jax() -> None:
    code = BLOCK_JAX + (
        "import serve, serve.app, serve.chat, serve.completions, serve.metrics_text, jaxllm.serve, jaxllm.cli\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')]\n"
        "print('imported without jax', flush=True)\n"
        "import jax\n"  # and the blocker was really in place
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "imported without jax", result.stderr
    assert result.returncode != 0 and "jax is blocked here: jax" in result.stderr
