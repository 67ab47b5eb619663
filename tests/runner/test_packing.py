"""The one-transfer packing of a step's arrays: exact round trips and layouts that match the
ones the runner compiles ahead."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxllm.runner.input_batch import CachedRequestState, StepArrays, sampling_arrays
from jaxllm.runner.model_runner import forward_layout, pack_forward, warm_sampling_layout
from jaxllm.runner.packing import pack, unpack
from jaxllm.runner.sampler import SamplerFlags
from jaxllm.sampling_params import SamplingParams


def test_round_trip_of_every_supported_dtype_inside_jit() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "ids": rng.integers(-(2**31), 2**31 - 1, (3, 5), dtype=np.int64).astype(np.int32),
        "absent": None,
        "seeds": rng.integers(0, 2**32 - 1, 7, dtype=np.uint64).astype(np.uint32),
        "temperature": np.array([0.0, -0.0, 1.5, np.inf, -np.inf, 1e-38], np.float32),
        "flags": np.array([True, False, True]),
    }
    buffer, layout = pack(arrays)
    assert buffer.dtype == np.int32 and buffer.shape == (15 + 7 + 6 + 3,) == (layout.size,)
    assert [name for name, _, _ in layout.fields] == ["ids", "seeds", "temperature", "flags"]
    out = jax.jit(unpack, static_argnums=1)(buffer, layout)
    for name, value in arrays.items():
        if value is None:
            assert name not in out
            continue
        got = np.asarray(out[name])
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.tobytes() == value.tobytes(), name  # bit-exact, signed zeros and infinities included


def test_64_bit_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match="x: float64"):
        pack({"x": np.zeros(2)})


def _step(num_tokens: int, num_slots: int, pages: int) -> StepArrays:
    t, s = np.arange(num_tokens, dtype=np.int32), np.arange(num_slots, dtype=np.int32)
    return StepArrays(
        input_ids=t, positions=t, slot_mapping=t, placeholder_rows=t,
        cu_q_lens=np.arange(num_slots + 1, dtype=np.int32), kv_lens=s,
        page_indices=np.zeros((num_slots, pages), np.int32), num_seqs=np.array([1], np.int32),
        logits_indices=s, req_ids=["a"], samples=[True],
    )


def test_forward_layout_is_what_a_step_packs() -> None:
    arrays = _step(64, 16, 8)
    _, layout = pack_forward(arrays, arrays.logits_indices)
    assert layout == forward_layout(64, 16, 8)


@pytest.mark.parametrize("bitmask", [False, True])
def test_warm_sampler_layout_is_what_a_greedy_or_temperature_step_packs(bitmask: bool) -> None:
    state = CachedRequestState("a", [1, 2], 2, SamplingParams(temperature=0.7), seed=3, page_ids=[0])
    flags = SamplerFlags(all_greedy=False, bitmask=bitmask)
    masks = {"a": np.full(4, -1, np.int32)} if bitmask else {}
    batch = sampling_arrays(_step(16, 16, 8), [state], 16, flags, masks, vocab_size=100, max_model_len=64)
    _, layout = pack({f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)})
    assert layout == warm_sampling_layout(16, 100, bitmask)
