"""Python source that makes jax (and flax) unimportable; prepend it to a `python -c` script."""

BLOCK_JAX = """
import sys
class BlockJax:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax"):
            raise ImportError(f"jax is blocked here: {name}")
        return None
sys.meta_path.insert(0, BlockJax())
"""
