"""StableInputs: a pytree of numpy arrays reaches the device intact, and a second put of the same
shapes lands in the first put's buffers (so the step's CUDA graphs need no update)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.models.sharding import make_mesh
from jaxllm.runner.sampler import SamplingBatch
from jaxllm.runner.step_inputs import StableInputs


def _inputs() -> StableInputs:
    return StableInputs(NamedSharding(make_mesh(1), PartitionSpec()))


def _tree(step: int):
    host = (np.arange(16, dtype=np.int32) + step, np.full((4, 8), step, np.int32))
    sampling = SamplingBatch(np.linspace(0, 2, 4, dtype=np.float32) + step,
                             np.array([0, 1, 2**32 - 1, step], np.uint32), np.arange(4, dtype=np.int32))
    return host, sampling


def _pointers(tree) -> list[int]:
    return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree)]


def test_values_dtypes_and_structure_survive_the_packing() -> None:
    inputs = _inputs()
    for step in range(3):
        want = _tree(step)
        got = inputs.put(want)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert got[1].top_k is None
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(np.asarray(g), w)


def test_the_next_put_of_the_same_shapes_reuses_the_buffers() -> None:
    inputs = _inputs()
    first = _pointers(inputs.put(_tree(0)))
    assert _pointers(inputs.put(_tree(1))) == first
    # Another shape gets buffers of its own and leaves the first set in place.
    other = (np.zeros(32, np.int32),)
    other_pointers = _pointers(inputs.put(other))
    assert _pointers(inputs.put(_tree(2))) == first
    assert _pointers(inputs.put(other)) == other_pointers


def test_a_leaf_that_cannot_be_packed_takes_the_plain_transfer() -> None:
    tree = (np.arange(4, dtype=np.int32), np.array([True, False]))
    got = _inputs().put(tree)
    np.testing.assert_array_equal(np.asarray(got[1]), tree[1])
    assert got[1].dtype == np.bool_
