"""BlockManager with exact page ids, ref counts and free-queue order (as vLLM's test_prefix_caching.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from jaxllm.engine.block_manager import BlockManager, hash_block
from jaxllm.engine.request import Request
from jaxllm.sampling_params import SamplingParams


def make_request(req_id: str, tokens: list[int], cache_salt: str | None = None, **params) -> Request:
    return Request(req_id, tokens, SamplingParams(**params), max_tokens=16, cache_salt=cache_salt)


def schedule(bm: BlockManager, request: Request) -> None:
    """What the scheduler does for a waiting request taking its whole prompt in one step."""
    bm.begin_step()
    hit = bm.find_cached_prefix(request)
    num_new = request.num_tokens - hit.num_tokens
    assert bm.can_allocate(request, num_new, hit)
    bm.allocate(request, num_new, hit)
    request.num_computed_tokens = request.num_tokens


def free_queue(bm: BlockManager) -> list[int]:
    return list(bm.free_pages)


def test_fresh_allocation_and_free_order():
    bm = BlockManager(num_pages=8, block_size=4)
    a = make_request("a", list(range(10)))
    schedule(bm, a)
    assert a.page_ids == [0, 1, 2]
    assert bm.ref_counts == [1, 1, 1, 0, 0, 0, 0, 0]
    assert free_queue(bm) == [3, 4, 5, 6, 7]
    # The two full blocks are cached, the partial third one is not.
    assert bm.hash_to_page == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    assert a.block_hashes[1] == hash_block(a.block_hashes[0], [4, 5, 6, 7], None)
    assert bm.usage == 3 / 8
    bm.free(a)
    # Tail first, so the shared-prefix blocks are evicted last.
    assert free_queue(bm) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.ref_counts == [0] * 8 and a.page_ids == []
    assert bm.usage == 0.0


def test_prefix_hit_reuses_pages_and_counts():
    bm = BlockManager(num_pages=8, block_size=4)
    a = make_request("a", list(range(10)))
    schedule(bm, a)
    b = make_request("b", list(range(8)) + [100, 101, 102])
    # In the step that computes a's blocks, b must wait for them rather than recompute them.
    hit = bm.find_cached_prefix(b)
    assert hit.pending and hit.page_ids == []
    bm.free(a)
    schedule(bm, b)
    assert b.page_ids == [0, 1, 3]  # two cached pages, then the oldest free page
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert free_queue(bm) == [4, 5, 6, 7, 2]
    assert b.num_registered_pages == 2
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10 + 11, 8)
    bm.free(b)
    assert free_queue(bm) == [4, 5, 6, 7, 2, 3, 1, 0]


def test_last_prompt_token_is_never_a_hit():
    bm = BlockManager(num_pages=8, block_size=4)
    a = make_request("a", list(range(8)))
    schedule(bm, a)
    bm.free(a)
    bm.begin_step()
    same = make_request("same", list(range(8)))
    hit = bm.find_cached_prefix(same)
    assert hit.page_ids == [0] and hit.num_tokens == 4 and not hit.pending


def test_shared_page_ref_counts():
    bm = BlockManager(num_pages=8, block_size=4)
    a = make_request("a", list(range(6)))
    schedule(bm, a)
    b = make_request("b", list(range(4)) + [50, 51, 52])
    bm.begin_step()
    schedule(bm, b)
    assert a.page_ids == [0, 1] and b.page_ids == [0, 2]
    assert bm.ref_counts[:3] == [2, 1, 1]
    bm.free(a)
    assert bm.ref_counts[:3] == [1, 0, 1] and 0 not in bm.free_pages
    bm.free(b)
    assert bm.ref_counts == [0] * 8
    assert free_queue(bm) == [3, 4, 5, 6, 7, 1, 2, 0]


def test_lru_eviction_oldest_first_and_tail_first():
    bm = BlockManager(num_pages=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    schedule(bm, a)
    bm.free(a)
    b = make_request("b", [5, 6, 7, 8])
    schedule(bm, b)
    assert b.page_ids == [2, 3]
    bm.free(b)
    assert free_queue(bm) == [1, 0, 3, 2]
    assert len(bm.hash_to_page) == 4
    c = make_request("c", [9, 9, 9])
    schedule(bm, c)
    assert c.page_ids == [1, 0]  # a's blocks were freed earliest: evicted first, its tail block before its head
    assert set(bm.hash_to_page.values()) == {1, 2, 3}  # b's two blocks, and c's full block in page 1
    assert bm.page_hash[1] == c.block_hashes[0]
    bm.begin_step()
    assert bm.find_cached_prefix(make_request("a2", [1, 2, 3, 4, 0])).page_ids == []
    assert bm.find_cached_prefix(make_request("b2", [5, 6, 7, 8, 0])).page_ids == [2, 3]
    bm.free(c)


def test_cache_salt_separates_caches():
    bm = BlockManager(num_pages=8, block_size=4)
    a = make_request("a", list(range(9)), cache_salt="alice")
    schedule(bm, a)
    bm.free(a)
    bm.begin_step()
    assert bm.find_cached_prefix(make_request("b", list(range(9)), cache_salt="bob")).page_ids == []
    assert bm.find_cached_prefix(make_request("c", list(range(9)))).page_ids == []
    assert bm.find_cached_prefix(make_request("d", list(range(9)), cache_salt="alice")).page_ids == [0, 1]


def test_can_allocate_counts_free_hit_pages_as_taken():
    bm = BlockManager(num_pages=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    schedule(bm, a)
    bm.free(a)
    bm.begin_step()
    long = make_request("long", [1, 2, 3, 4, 5, 6, 7])  # hit 2 pages, needs 2 more: only 1 is really free
    hit = bm.find_cached_prefix(long)
    assert hit.page_ids == [0, 1]
    assert not bm.can_allocate(long, 3, hit)
    short = make_request("short", [1, 2, 3, 4, 5])
    hit = bm.find_cached_prefix(short)
    assert bm.can_allocate(short, 1, hit)
    bm.allocate(short, 1, hit)
    assert short.page_ids == [0, 1, 2] and bm.num_free_pages == 0
    bm.free(short)


def test_append_slots_grows_by_pages():
    bm = BlockManager(num_pages=2, block_size=4)
    a = make_request("a", [1, 2, 3, 4])
    schedule(bm, a)
    assert bm.can_append(a, 4) and not bm.can_append(a, 5)
    assert bm.append_slots(a, 1) == [1]
    a.num_computed_tokens += 1
    assert bm.append_slots(a, 3) == []  # still fits in page 1
    bm.free(a)


def test_disabled_prefix_caching_and_prompt_logprobs_never_hit():
    bm = BlockManager(num_pages=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    schedule(bm, a)
    assert bm.hash_to_page == {} and bm.prefix_cache_queries == 0
    bm.free(a)
    assert bm.find_cached_prefix(make_request("b", list(range(9)))).page_ids == []

    bm = BlockManager(num_pages=8, block_size=4)
    a = make_request("a", list(range(9)))
    schedule(bm, a)
    bm.free(a)
    bm.begin_step()
    assert bm.find_cached_prefix(make_request("p", list(range(9)), prompt_logprobs=1)).page_ids == []


def test_block_hash_is_stable_across_processes():
    code = ("from jaxllm.engine.block_manager import hash_block\n"
            "print(hash_block(hash_block(None, [1, 2, 3], 'salt'), [4, 5, 6], None).hex())")
    local = hash_block(hash_block(None, [1, 2, 3], "salt"), [4, 5, 6], None).hex()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == local
    assert hash_block(None, [1, 2, 3], None) != hash_block(None, [1, 2, 4], None)
