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
    # Several leaves of one shape and dtype, as the runner's [T] i32 columns: they must not trade places.
    host = (np.arange(16, dtype=np.int32) + step, np.arange(16, dtype=np.int32) * 2 - step,
            np.full((4, 8), step, np.int32), np.full(16, 7 * step, np.int32))
    sampling = SamplingBatch(np.linspace(0, 2, 4, dtype=np.float32) + step,
                             np.array([0, 1, 2**32 - 1, step], np.uint32), np.arange(4, dtype=np.int32),
                             allowed_only=np.array([True, False, step % 2 == 0, True]))
    return host, sampling


def _pointers(tree) -> list[int]:
    return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree)]


def _assert_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), w)


def test_values_dtypes_and_structure_survive_the_packing() -> None:
    inputs = _inputs()
    for step in range(3):
        host, sampling = _tree(step)
        got_host, got_sampling = inputs.put(host, sampling)
        assert got_sampling.top_k is None
        _assert_equal((got_host, got_sampling), (host, sampling))
        _assert_equal(inputs.put(sampling), (sampling,))  # a tuple, one per tree


def test_the_next_put_of_the_same_shapes_reuses_the_buffers() -> None:
    inputs = _inputs()
    host, sampling = _tree(0)
    first_host, first_sampling = map(_pointers, inputs.put(host, sampling))
    host, sampling = _tree(1)
    got_host, got_sampling = map(_pointers, inputs.put(host, sampling))
    assert (got_host, got_sampling) == (first_host, first_sampling)
    # Each tree keeps its own buffers: the host set stays put beside other sampling columns too.
    other_columns = SamplingBatch(np.zeros(8, np.float32), np.zeros(8, np.uint32), np.zeros(8, np.int32))
    got_host, other = map(_pointers, inputs.put(host, other_columns))
    assert got_host == first_host
    assert _pointers(inputs.put(sampling)) == first_sampling
    assert _pointers(inputs.put(host, other_columns)) == first_host + other


def test_a_tree_that_cannot_be_packed_takes_the_plain_transfer() -> None:
    tree = (np.arange(4, dtype=np.int32), np.array([1.5, 2.0], np.float16))
    (got,) = _inputs().put(tree)
    _assert_equal(got, tree)
