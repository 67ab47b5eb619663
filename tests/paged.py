"""Test helper: drive a loaded model through the page pool without the engine.

A request's tokens are fed in the given chunks (prefill chunks, then single-token decodes),
each step writing K/V into freshly allocated pages, as the runner does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import kv_pages_shape
from jaxllm.runner.attention import select_attention
from jaxllm.runner.model_loading import LoadedModel


def _pad(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class PagedRunner:
    """One request at a time through a small page pool; returns float32 logits of every position."""

    def __init__(self, loaded: LoadedModel, backend: str, page_size: int = 16, num_pages: int = 64,
                 block_every_step: bool = True):
        self.loaded = loaded
        self.page_size = page_size
        self.num_pages = num_pages
        attention, _ = select_attention(backend, loaded.arch, loaded.dtype, page_size, loaded.mesh, loaded.rules)
        self.forward = jax.jit(loaded.forward_fn(attention), donate_argnums=(1,))
        self.block = block_every_step
        shape = kv_pages_shape(loaded.arch, num_pages, page_size)
        from jaxllm.models.sharding import kv_pages_sharding

        sharding = kv_pages_sharding(loaded.mesh, loaded.rules)
        self.kv = [jax.device_put(jnp.zeros(shape, loaded.dtype), sharding) for _ in range(loaded.arch.num_layers)]
        # Pages in a scrambled order, so page indirection is exercised.
        self.pages = np.random.default_rng(0).permutation(num_pages).astype(np.int32)

    def step(self, tokens: list[int], start: int, last_only: bool = False) -> np.ndarray:
        """Feed tokens at positions start.. ; returns logits [len(tokens), V] (or [1, V] if last_only)."""
        n = len(tokens)
        T = _pad(n)
        end = start + n
        pos = np.arange(start, end, dtype=np.int32)
        input_ids = np.zeros(T, np.int32)
        input_ids[:n] = tokens
        positions = np.zeros(T, np.int32)
        positions[:n] = pos
        slots = np.full(T, self.num_pages * self.page_size, np.int32)
        slots[:n] = self.pages[pos // self.page_size] * self.page_size + pos % self.page_size
        max_pages = self.num_pages
        logits_idx = np.zeros(T, np.int32)
        logits_idx[:n] = np.arange(n)
        if last_only:
            logits_idx = np.full(16, n - 1, np.int32)
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slots,
            cu_q_lens=np.array([0, n, n], np.int32),
            kv_lens=np.array([end, 0], np.int32),
            page_indices=np.stack([self.pages[:max_pages], np.zeros(max_pages, np.int32)]).astype(np.int32),
            num_seqs=np.array([1], np.int32),
            logits_indices=logits_idx,
        )
        self.kv, logits = self.forward(
            self.loaded.leaves, self.kv, batch, np.full(T, -1, np.int32), np.zeros(4, np.int32)
        )
        if self.block:
            jax.block_until_ready(self.kv)
        return np.asarray(logits)[: 1 if last_only else n]

    def run(self, prompt: list[int], chunks: list[int], num_decode: int) -> tuple[np.ndarray, list[int]]:
        """Prefill `prompt` in chunks of the given sizes, then greedy-decode num_decode tokens.

        Returns (logits of every prompt and decode position [len(prompt) + num_decode, V], decoded ids).
        """
        assert sum(chunks) == len(prompt)
        out, start = [], 0
        for size in chunks:
            out.append(self.step(prompt[start : start + size], start))
            start += size
        decoded: list[int] = []
        for _ in range(num_decode):
            nxt = int(np.argmax(out[-1][-1]))
            decoded.append(nxt)
            out.append(self.step([nxt], start))
            start += 1
        return np.concatenate(out), decoded
