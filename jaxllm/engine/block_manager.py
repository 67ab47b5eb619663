"""KV page bookkeeping: a preallocated pool, ref counts, and a prefix cache over full blocks.

Every page of the pool (ids 0..num_pages-1, no reserved null page: the runner pads with
out-of-range slots) is either held by requests (ref count > 0) or free. Free pages sit in one
LRU queue, oldest first; a free page may still hold a cached block (a registered hash), which a
later request with the same prefix reuses without recompute. A fresh page is taken from the front
of the queue and loses its hash then (eviction).

A block's hash chains its parent's hash, its token ids and the request's cache_salt (sha256:
stable across processes). Only full blocks of known tokens whose KV is computed are cached.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from jaxllm.engine.request import Request


def hash_block(parent: bytes | None, token_ids: Sequence[int], cache_salt: str | None) -> bytes:
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    if cache_salt:
        digest.update(cache_salt.encode())
    return digest.digest()


class PrefixHit(NamedTuple):
    page_ids: list[int]  # cached pages holding the request's first len(page_ids) blocks
    num_tokens: int  # tokens they cover (len(page_ids) * block_size)
    # The next block is being computed by another request in this very step: waiting one step
    # turns it into a hit instead of a duplicate computation (n > 1 siblings, shared prompts).
    pending: bool


NO_HIT = PrefixHit([], 0, False)


class BlockManager:
    def __init__(self, num_pages: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_pages = num_pages
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.page_hash: list[bytes | None] = [None] * num_pages
        self.hash_to_page: dict[bytes, int] = {}
        self.free_pages: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))  # LRU, oldest first
        # Pages registered in the cache by allocations of the step being scheduled.
        # NOTE: their KV is written by this step, so another request of the same step must not read
        # them (a kernel may write K/V and read pages of other requests in any order).
        self._registered_this_step: set[int] = set()
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def usage(self) -> float:
        """Fraction of pages held by requests (cached free pages count as free, as vLLM)."""
        return 1.0 - len(self.free_pages) / self.num_pages

    def begin_step(self) -> None:
        self._registered_this_step.clear()

    def find_cached_prefix(self, request: Request) -> PrefixHit:
        """The longest cached prefix of a request that holds no pages (never its last token)."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return NO_HIT  # NOTE: prompt logprobs need every prompt position computed, as vLLM
        self._update_block_hashes(request)
        # At least one token must be computed so that the request can sample.
        max_blocks = (request.num_tokens - 1) // self.block_size
        pages: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            page = self.hash_to_page.get(block_hash)
            if page is None:
                break
            if page in self._registered_this_step:
                return PrefixHit(pages, len(pages) * self.block_size, True)
            pages.append(page)
        return PrefixHit(pages, len(pages) * self.block_size, False)

    def can_allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """Whether a request holding no pages can take `hit` and pages for num_new_tokens after it."""
        # Hit pages sitting in the free queue stop being free when taken.
        free_hits = sum(1 for page in hit.page_ids if self.ref_counts[page] == 0)
        num_fresh = self._num_pages_for(hit.num_tokens + num_new_tokens) - len(hit.page_ids)
        return num_fresh <= len(self.free_pages) - free_hits

    def allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> list[int]:
        """Give a request holding no pages its cached prefix and fresh pages; returns all its pages."""
        assert not request.page_ids, f"request {request.req_id} already holds pages"
        for page in hit.page_ids:
            if self.ref_counts[page] == 0:
                del self.free_pages[page]
            self.ref_counts[page] += 1
        request.page_ids = list(hit.page_ids)
        request.num_registered_pages = len(hit.page_ids)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += hit.num_tokens
        self._grow(request, hit.num_tokens + num_new_tokens)
        return list(request.page_ids)

    def can_append(self, request: Request, num_new_tokens: int) -> bool:
        """Whether a running request can get the pages for num_new_tokens more tokens."""
        num_fresh = self._num_pages_for(request.num_computed_tokens + num_new_tokens) - len(request.page_ids)
        return num_fresh <= len(self.free_pages)

    def append_slots(self, request: Request, num_new_tokens: int) -> list[int]:
        """Pages for num_new_tokens more tokens of a running request; returns the pages added."""
        return self._grow(request, request.num_computed_tokens + num_new_tokens)

    def free(self, request: Request) -> None:
        """Drop a request's pages; cached ones stay reusable until evicted."""
        self._register_full_blocks(request, request.num_computed_tokens)
        # Tail blocks first, so they are evicted before the prefix blocks more requests share.
        for page in reversed(request.page_ids):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free_pages[page] = None
        request.page_ids = []
        request.num_registered_pages = 0

    def _num_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _grow(self, request: Request, num_tokens: int) -> list[int]:
        new_pages = [self._take_fresh_page() for _ in range(self._num_pages_for(num_tokens) - len(request.page_ids))]
        request.page_ids.extend(new_pages)
        self._registered_this_step.update(self._register_full_blocks(request, num_tokens))
        return new_pages

    def _take_fresh_page(self) -> int:
        page, _ = self.free_pages.popitem(last=False)
        old_hash = self.page_hash[page]
        if old_hash is not None:  # evict the cached block it held
            del self.hash_to_page[old_hash]
            self.page_hash[page] = None
        self.ref_counts[page] = 1
        return page

    def _update_block_hashes(self, request: Request) -> None:
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(len(request.block_hashes), len(tokens) // bs):
            parent = request.block_hashes[i - 1] if i else None
            request.block_hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs], request.cache_salt))

    def _register_full_blocks(self, request: Request, num_computed_tokens: int) -> list[int]:
        """Cache the request's full, known, computed blocks not yet cached; returns their pages."""
        if not self.enable_prefix_caching or num_computed_tokens // self.block_size <= request.num_registered_pages:
            return []  # nothing new is full (most decode steps)
        self._update_block_hashes(request)
        end = min(num_computed_tokens // self.block_size, len(request.block_hashes), len(request.page_ids))
        registered = []
        for i in range(request.num_registered_pages, end):
            page, block_hash = request.page_ids[i], request.block_hashes[i]
            # A block computed twice (no hit at the time) stays cached in the first page only.
            if self.page_hash[page] is None and block_hash not in self.hash_to_page:
                self.page_hash[page] = block_hash
                self.hash_to_page[block_hash] = page
                registered.append(page)
        request.num_registered_pages = max(request.num_registered_pages, end)
        return registered
