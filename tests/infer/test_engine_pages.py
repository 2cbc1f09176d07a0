"""The engine's host-side page allocator and prefix hashing (no model, no device)."""
import pytest

from jaxtx.infer.engine import EngineConfig, PageAllocator, page_hashes
from jaxtx.infer.engine.scheduler import Scheduler


def test_allocate_release_refcounts_and_invariants():
    a = PageAllocator(6, 4)
    x = a.allocate(4)
    assert sorted(x) == [0, 1, 2, 3] and a.num_free == 2 and a.num_used == 4
    assert a.allocate(3) is None and a.num_free == 2  # all or nothing
    a.acquire([])
    a.release(x[:2])
    assert a.num_free == 4
    with pytest.raises(RuntimeError, match="released more times"):
        a.release([x[0]])
    a.check()


def test_chained_hashes_depend_on_the_whole_prefix_and_the_salt():
    t = list(range(12))
    h = page_hashes(t, 4)
    assert len(h) == 3 and len(page_hashes(t + [1, 2], 4)) == 3  # the partial page has none
    assert page_hashes([9] + t[1:], 4)[2] != h[2]  # a change in page 0 changes page 2's hash
    assert page_hashes(t, 4, salt="a")[0] != h[0] and page_hashes(t, 4, salt="a") == page_hashes(t, 4, salt="a")
    assert page_hashes(t[4:], 4, parent=h[0]) == h[1:]  # incremental == all at once


def test_cached_free_pages_are_reused_then_evicted_lru_first():
    a = PageAllocator(4, 2)
    h = page_hashes([1, 2, 3, 4, 5, 6], 2)
    p = a.allocate(3)
    for page, hh in zip(p, h):
        a.register(page, hh)
    a.release(p[::-1])  # tail first: the last page is the oldest in the LRU
    assert a.num_free == 4 and len(a.cached_free) == 3
    assert a.lookup(h) == p and a.lookup([h[0], b"x", h[2]]) == p[:1]
    a.acquire(p[:2])  # a new request takes the first two pages back
    assert a.num_used == 2 and a.ref[p[0]] == 1
    a.acquire(p[:1])  # and a third shares page 0
    assert a.ref[p[0]] == 2
    got = a.allocate(2)  # the free page first, then the least recently freed hashed page (p[2])
    assert p[2] in got and a.lookup(h) == p[:2]
    a.check()
    a.release(p[:1] + p[:2] + got)
    assert a.num_free == 4
    a.check()


def test_register_keeps_the_first_page_for_a_hash():
    a = PageAllocator(3, 2)
    x, y = a.allocate(2)
    a.register(x, b"h")
    a.register(y, b"h")  # same content computed twice: y stays unhashed
    assert a.lookup([b"h"]) == [x] and a.page_hash[y] is None
    a.release([x, y])
    assert len(a.cached_free) == 1 and len(a.free) == 2
    a.check()


def test_max_pages_and_window():
    cfg = EngineConfig(max_seqs=2, page_size=4, num_pages=8, max_tokens_per_step=8)
    assert Scheduler(cfg, window=None, max_model_len=64).max_pages(30) == 8
    assert Scheduler(cfg, window=4, max_model_len=64).max_pages(30) == 4  # (window + chunk) / page + 1


@pytest.mark.parametrize("kw, match", [
    (dict(max_seqs=0), "max_seqs=0"), (dict(page_size=2.0), "page_size=2.0"),
    (dict(max_seqs=32, max_tokens_per_step=16), "max_tokens_per_step=16 must be >= max_seqs"),
    (dict(min_token_bucket=12), "power of two"), (dict(max_model_len=1), "max_model_len=1"),
    (dict(max_logprobs=-1), "max_logprobs=-1")])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_token_buckets():
    c = EngineConfig(max_seqs=4, max_tokens_per_step=100, min_token_bucket=16)
    assert c.token_buckets() == (16, 32, 64, 128) and c.bucket(17) == 32 and c.decode_buckets() == (16,)
    c = EngineConfig(max_seqs=16, max_tokens_per_step=64, min_token_bucket=4)
    assert c.decode_buckets() == (4, 8, 16)
