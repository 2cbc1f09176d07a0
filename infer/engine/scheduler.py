"""Continuous batching on the host: requests, admission, chunked prefill, page growth, preemption, prefix reuse.

Each round (`schedule`) decides how many tokens of each request the next device step computes:
  1. running requests, oldest admission first: a decoding request computes its 1 pending token, a prefilling one the
     next chunk of its prompt (decode tokens are reserved first, so prefill never starves decode);
  2. when pages run out, the most recently admitted running request is preempted by recompute: its pages are
     released (their hashes kept, so its own prefix is usually a cache hit when it comes back), it returns to the
     front of the waiting queue and keeps its generated tokens (its sampling key counts them, so its samples do not
     change);
  3. then waiting requests, first come first served, while a row (max_seqs), token budget and pages are free; a new
     request first takes every cached full page of its known tokens (capped so at least one token is computed: the
     last token's logits are needed).
The flat token axis packs the decode tokens first, then the prefill chunks.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional

from jaxtx.infer.engine.config import EngineConfig
from jaxtx.infer.engine.pages import PageAllocator, page_hashes
from jaxtx.sampling import Sampling


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list
    max_new_tokens: int
    sampling: Sampling
    seed: int = 0
    stop_seqs: list = dataclasses.field(default_factory=list)  # token-id sequences (single tokens: length 1)
    logprobs: Optional[int] = None
    prompt_logprobs: bool = False
    allowed_tokens: Optional[Callable] = None
    cache_salt: Optional[str] = None
    adapter: Optional[str] = None  # LoRA adapter name (None = the base)
    adapter_slot: int = 0  # its slot in the engine's stacked adapters (0 = the base)

    output: list = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in this request's pages
    pages: list = dataclasses.field(default_factory=list)  # logical page i -> page id (-1: freed, out of window)
    hashes: list = dataclasses.field(default_factory=list)  # chained hashes of the full pages of all_tokens
    registered: int = 0  # pages registered in the prefix cache
    cached_tokens: int = 0  # prefix-cache hit of the first admission
    admitted: bool = False  # admitted at least once (cached_tokens is final)
    slot: int = -1
    row_set: bool = False  # its penalty row on device holds its tokens (reset when it loses its slot)
    prompt_lp: list = dataclasses.field(default_factory=list)
    prompt_lp_sent: bool = False

    @property
    def all_tokens(self) -> list:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def decoding(self) -> bool:
        return self.num_computed == self.num_tokens - 1

    @property
    def stop_token_ids(self) -> list:
        return [s[0] for s in self.stop_seqs if len(s) == 1]


@dataclasses.dataclass
class Scheduled:
    req: Request
    n: int  # tokens computed this step
    sample: bool  # its last token this step is its last known token: a new token is sampled


@dataclasses.dataclass
class ScheduleOutput:
    seqs: list  # [Scheduled] in flat-axis order (decodes first)
    preempted: list  # [Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.n for s in self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, *, window: Optional[int], max_model_len: int):
        self.cfg = config
        self.window, self.max_model_len = window, max_model_len
        self.alloc = PageAllocator(config.num_pages, config.page_size)
        self.waiting: collections.deque = collections.deque()
        self.running: list = []  # admission order: preemption takes from the end
        self.free_slots = list(range(config.max_seqs))[::-1]
        self.prefix_cached_tokens = 0  # prefix-cache hit tokens over all admissions
        self.preemptions = 0

    # ------------------------------------------------------------------------------------------------ sizing
    def max_pages(self, total_tokens: int) -> int:
        """The most pages a request of total_tokens (prompt + max new) ever holds at once."""
        ps = self.cfg.page_size
        full = -(-total_tokens // ps)
        if self.window is None:
            return full
        # live positions: the window behind the oldest query of a chunk, plus the chunk itself, on page boundaries
        return min(full, -(-(self.window + self.cfg.max_tokens_per_step) // ps) + 1)

    # ------------------------------------------------------------------------------------------------ pages
    def _grow(self, req: Request, upto: int) -> bool:
        """Give req pages for its first `upto` tokens; False (nothing taken) if the pool cannot."""
        need = -(-upto // self.cfg.page_size) - len(req.pages)
        if need <= 0:
            return True
        got = self.alloc.allocate(need)
        if got is None:
            return False
        req.pages.extend(got)
        return True

    def release(self, req: Request) -> None:
        """Give back every page and the row of req (finished, aborted or preempted)."""
        self.alloc.release([p for p in reversed(req.pages) if p >= 0])
        req.pages, req.registered = [], 0
        if req.slot >= 0:
            self.free_slots.append(req.slot)
            req.slot, req.row_set = -1, False

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        req.num_computed = 0
        if not req.prompt_lp_sent:  # recomputed from the start: its prompt log-probs are gathered again
            req.prompt_lp = []
        self.waiting.appendleft(req)

    def _hashes(self, req: Request) -> list:
        toks = req.all_tokens
        n_full = len(toks) // self.cfg.page_size
        if len(req.hashes) < n_full:
            parent = req.hashes[-1] if req.hashes else b""
            req.hashes += page_hashes(toks[len(req.hashes) * self.cfg.page_size: n_full * self.cfg.page_size],
                                      self.cfg.page_size, req.cache_salt if not req.hashes else None, parent,
                                      req.adapter)
        return req.hashes

    def register_full_pages(self, req: Request) -> None:
        """After a step: pages now fully computed enter the prefix cache."""
        if not self.cfg.prefix_caching or self.window is not None:
            return
        n = min(req.num_computed // self.cfg.page_size, len(req.pages))
        if n <= req.registered:
            return
        hashes = self._hashes(req)
        for i in range(req.registered, n):
            if req.pages[i] >= 0:
                self.alloc.register(req.pages[i], hashes[i])
        req.registered = n

    def free_out_of_window(self, req: Request) -> None:
        """Sliding-window models: pages whose every position is out of the next query's window are released (they
        keep their hash). The next query sits at num_computed and attends positions > num_computed - window."""
        if self.window is None:
            return
        dead = max(0, (req.num_computed - self.window + 1) // self.cfg.page_size)
        for i in range(min(dead, len(req.pages))):
            if req.pages[i] >= 0:
                self.alloc.release([req.pages[i]])
                req.pages[i] = -1

    # ------------------------------------------------------------------------------------------------ admission
    def _admit(self, req: Request, budget: int) -> Optional[int]:
        """Take prefix hits and pages for req's first chunk; the chunk size, or None (nothing taken)."""
        hit_pages = []
        # sliding-window models take no hits: a hit prefix would hold pages the window has already left
        if self.cfg.prefix_caching and self.window is None and not req.prompt_logprobs:
            ps = self.cfg.page_size
            n_hash = (req.num_tokens - 1) // ps  # full pages strictly before the last token
            hit_pages = self.alloc.lookup(self._hashes(req)[:n_hash])
        cached = len(hit_pages) * self.cfg.page_size
        n = min(req.num_tokens - cached, budget)
        need = -(-(cached + n) // self.cfg.page_size) - len(hit_pages)
        # hit pages that are cached-free count against the free pool once taken
        free_after_hits = self.alloc.num_free - sum(1 for p in hit_pages if self.alloc.ref[p] == 0)
        if need > free_after_hits:
            return None
        self.alloc.acquire(hit_pages)
        req.pages = list(hit_pages) + self.alloc.allocate(need)
        req.num_computed, req.registered = cached, len(hit_pages)
        self.prefix_cached_tokens += cached
        if not req.admitted:
            req.cached_tokens, req.admitted = cached, True
        req.slot = self.free_slots.pop()
        self.running.append(req)
        return n

    # ------------------------------------------------------------------------------------------------ one round
    def schedule(self) -> ScheduleOutput:
        cfg = self.cfg
        budget = cfg.max_tokens_per_step
        budget -= sum(1 for r in self.running if r.decoding)  # decode tokens come first
        plan, preempted = {}, []
        for req in list(self.running):
            if req not in self.running:  # preempted by an earlier request of this round
                continue
            if req.decoding:
                n = 1
            else:
                n = min(req.num_tokens - req.num_computed, budget)
                if n <= 0:
                    continue
            while not self._grow(req, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                self.preemptions += 1
                preempted.append(victim)
                if victim is req:
                    break
            if req not in self.running:
                continue
            if not req.decoding:
                budget -= n
            plan[req.id] = (req, n)
        # a preempted request being decode-reserved freed its budget token; new requests wait when memory is short
        if not preempted:
            while self.waiting and self.free_slots and budget > 0:
                n = self._admit(self.waiting[0], budget)
                if n is None:
                    break
                req = self.waiting.popleft()
                budget -= n
                plan[req.id] = (req, n)
        seqs = [Scheduled(r, n, r.num_computed + n == r.num_tokens) for r, n in plan.values()]
        seqs.sort(key=lambda s: not (s.req.decoding and s.n == 1))  # stable: decodes first
        return ScheduleOutput(seqs, preempted)

    def finish_step(self, out: ScheduleOutput) -> None:
        """Account the computed tokens (before sampled tokens are appended)."""
        for s in out.seqs:
            s.req.num_computed += s.n
            self.register_full_pages(s.req)
            self.free_out_of_window(s.req)

    def stats(self) -> dict:
        return {"pages_total": self.cfg.num_pages, "pages_used": self.alloc.num_used,
                "pages_cached_free": len(self.alloc.cached_free), "pages_free": len(self.alloc.free),
                "running": len(self.running), "waiting": len(self.waiting),
                "prefix_cached_tokens": self.prefix_cached_tokens, "preemptions": self.preemptions}
