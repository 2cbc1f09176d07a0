"""The host-side page allocator: free list, reference counts, and the prefix cache (chained page hashes + LRU).

A page is in exactly one of three states:
  used         ref > 0: held by one or more requests (shared prefix pages have ref > 1)
  cached-free  ref == 0 and it still carries the hash of the full page of tokens it holds: a later request with the
               same prefix can take it back without recomputing; it is evicted (hash dropped) least recently freed
               first when the free list runs dry
  free         ref == 0, no hash
Only full pages are hashed. A page's hash chains the previous page's hash, its own token ids and (on the first page)
an optional per-request cache salt and the request's LoRA adapter, so equal hashes mean equal whole prefixes computed
by the same weights, never just an equal page (K/V computed under one adapter are wrong for another or the base).
"""
from __future__ import annotations

import collections
import hashlib
from typing import Optional, Sequence

import numpy as np


def page_hashes(tokens: Sequence[int], page_size: int, salt: Optional[str] = None, parent: bytes = b"",
                adapter: Optional[str] = None) -> list:
    """Chained sha256 digests of the full pages of `tokens` (a trailing partial page gets none). adapter: the LoRA
    adapter the K/V are computed under (None = the base)."""
    out = []
    h = parent
    for i in range(len(tokens) // page_size):
        m = hashlib.sha256(h)
        if i == 0 and not parent and salt is not None:
            m.update(b"salt:" + str(salt).encode())
        if i == 0 and not parent and adapter is not None:
            m.update(b"adapter:" + str(adapter).encode())
        m.update(np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes())
        h = m.digest()
        out.append(h)
    return out


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.ref = np.zeros(num_pages, np.int32)
        self.page_hash: list = [None] * num_pages
        self.by_hash: dict = {}  # hash -> page
        self.free: collections.deque = collections.deque(range(num_pages))  # no hash
        self.cached_free: collections.OrderedDict = collections.OrderedDict()  # page -> None, oldest first

    # ------------------------------------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Pages a request can get now (free + cached-free)."""
        return len(self.free) + len(self.cached_free)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    # ------------------------------------------------------------------------------------------------ prefix cache
    def lookup(self, hashes: Sequence[bytes]) -> list:
        """The pages holding the longest cached prefix of `hashes` (stops at the first miss)."""
        pages = []
        for h in hashes:
            p = self.by_hash.get(h)
            if p is None:
                break
            pages.append(p)
        return pages

    def acquire(self, pages: Sequence[int]) -> None:
        """Take a reference on cached pages (used or cached-free)."""
        for p in pages:
            if self.ref[p] == 0:
                if p not in self.cached_free:
                    raise RuntimeError(f"page {p} is free and carries no hash: it cannot be acquired")
                del self.cached_free[p]
            self.ref[p] += 1

    def register(self, page: int, h: bytes) -> None:
        """Record that a held page is full and holds the prefix with hash h. If another page already holds it, this
        page stays unhashed (it is freed normally)."""
        if self.page_hash[page] is None and h not in self.by_hash:
            self.page_hash[page] = h
            self.by_hash[h] = page

    # ------------------------------------------------------------------------------------------------ alloc / free
    def allocate(self, n: int) -> Optional[list]:
        """n fresh pages (ref 1), or None (nothing taken) if fewer than n are available. Unhashed free pages go
        first; then cached-free pages are evicted least recently freed first."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self.free:
                p = self.free.popleft()
            else:
                p, _ = self.cached_free.popitem(last=False)
                del self.by_hash[self.page_hash[p]]
                self.page_hash[p] = None
            self.ref[p] = 1
            out.append(p)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference on each page. Pass a request's pages tail first: hashed pages join the LRU in that
        order, so a prompt's later pages are evicted before its earlier ones (which more requests share)."""
        for p in pages:
            if self.ref[p] <= 0:
                raise RuntimeError(f"page {p} released more times than it was taken")
            self.ref[p] -= 1
            if self.ref[p] == 0:
                if self.page_hash[p] is not None:
                    self.cached_free[p] = None
                else:
                    self.free.append(p)

    def check(self) -> None:
        """Invariants (tests): every page in exactly one state, the hash maps consistent."""
        free, cached = set(self.free), set(self.cached_free)
        assert len(free) == len(self.free) and not free & cached
        for p in range(self.num_pages):
            assert (self.ref[p] == 0) == (p in free or p in cached), p
            assert (p in free) <= (self.page_hash[p] is None), p
            assert (p in cached) <= (self.page_hash[p] is not None), p
        assert all(self.page_hash[p] == h for h, p in self.by_hash.items())
        assert sum(h is not None for h in self.page_hash) == len(self.by_hash)
