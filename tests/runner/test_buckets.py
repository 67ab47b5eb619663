"""The forward buckets a runner compiles: token counts per step and page-table widths."""

from jaxllm.runner.compilation import Buckets, page_buckets
from jaxllm.runner.limits import SchedulerLimits, token_buckets


def test_token_buckets_are_powers_of_two_ending_at_the_budget():
    assert token_buckets(256, 16) == [16, 32, 64, 128, 256]
    assert token_buckets(300, 16) == [16, 32, 64, 128, 256, 300]


def test_many_sequences_get_128_token_steps_where_decode_batches_are_compute_bound():
    assert token_buckets(16384, 1024) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 2048, 4096,
                                          8192, 16384]
    # Decode-only batches never exceed max_num_seqs tokens: no fine steps above it.
    assert token_buckets(2048, 256) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert token_buckets(4096, 600) == [16, 32, 64, 128, 256, 384, 512, 1024, 2048, 4096]


def test_page_buckets_keep_the_widest_and_a_quarter():
    assert page_buckets(256) == [64, 256]
    assert page_buckets(8) == [8]


def test_a_step_takes_the_smallest_bucket_that_holds_it():
    sched = SchedulerLimits(max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=256,
                            token_buckets=(16, 64, 256), async_scheduling=True)
    buckets = Buckets.plan(sched, page_size=16, attention_name="xla")
    assert buckets.pages == (64, 256) and buckets.keys[:2] == [(16, 64), (16, 256)]
    assert buckets.pick(17, 3) == (64, 64) and buckets.pick(256, 65) == (256, 256)
    assert buckets.slots(16) == 16 and buckets.slots(256) == 64
    # The Mosaic kernel reads only the pages a request covers: one page-table width.
    assert Buckets.plan(sched, page_size=16, attention_name="pallas").pages == (256,)
