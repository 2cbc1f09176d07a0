"""The serving engine: continuous batching over a paged KV cache with one jitted ragged step.

    engine = Engine(model, params, EngineConfig(max_seqs=16, page_size=16, num_pages=512))
    rid = engine.add_request([1, 5, 9], max_new_tokens=32, sampling=Sampling(temperature=0.8), seed=0)
    while engine.has_work():
        for ev in engine.step():
            print(ev.request_id, ev.token_ids, ev.finished)

The host (this file and scheduler.py) decides what each step computes; the device runs `step.ragged_step` (or, when
nothing is waiting, `step.decode_loop`, several decode steps in one program). add_request and abort may be called
from other threads; step is called from one thread.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import secrets
import threading
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx.infer import prompts as prompts_lib
from jaxtx.infer.engine import sampling_batch as sb
from jaxtx.infer.engine import step as step_lib
from jaxtx.infer.engine.config import EngineConfig
from jaxtx.infer.engine.scheduler import Request, ScheduleOutput, Scheduled, Scheduler
from jaxtx.infer.generation import Generation, compiled
from jaxtx.sampling import GREEDY, Sampling

MAX_DEVICE_STOP_IDS = 16  # single-token stops checked inside the decode loop; longer lists are checked on the host


@dataclasses.dataclass(frozen=True)
class Event:
    request_id: str
    token_ids: list  # new tokens this step (every sampled token, stop tokens included, as they arrive)
    logprobs: Optional[list] = None  # log p of each new token (raw model distribution), if the request asked
    top_logprobs: Optional[list] = None  # [{token id: logprob}] per new token, the request's top-N
    prompt_logprobs: Optional[list] = None  # first event only, if asked: [None, lp(prompt[1]), ...]
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    stop_len: int = 0  # trailing output tokens that form the matched stop sequence (finish_reason "stop")
    error: Optional[str] = None  # why a request was ended by the engine (finish_reason "abort"), e.g. a bad bitmask


def _jitted(model):
    """(step, loop) jitted once per model object through infer's one jit cache (generation.compiled): engines over
    the same model (other pool sizes or scheduling settings of the same shapes) share executables."""
    step = compiled(step_lib.ragged_step, model, static_argnames=("all_logits", "n_top"), donate_argnames=("state",))
    loop = compiled(step_lib.decode_loop, model, static_argnames=("steps", "n_top", "page_size"),
                    donate_argnames=("state",))
    return step, loop


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_penalty_row(state, slot, seen_V, counts_V):
    return state._replace(seen=state.seen.at[slot].set(seen_V), counts=state.counts.at[slot].set(counts_V))


class Engine:
    def __init__(self, model, params, config: EngineConfig = EngineConfig(), *, cache=None, warmup: bool = True,
                 mesh=None, rules=None, adapters: Optional[Mapping[str, dict]] = None):
        """model, params: a decoder-only jaxtx model (any layout; unrolled decodes faster, see for_decoding).
        adapters: {name: params holding a LoRA adapter of this base (load_peft / add_lora)}: served together over
        the one base, each request picking one by name (add_request(adapter=name); None = the base). They are
        stacked (jaxtx.lora.stack_adapters) and every step selects each token's adapter as data, so any mix of
        adapters in a batch runs the same compiled step.
        cache: a pre-built paged cache (default: PagedKVCache.init(model.cfg, num_pages, page_size)).
        warmup: compile every bucket now (else call `warmup()` before serving; nothing compiles afterwards).
        mesh, rules: the mesh and logical rules the params are sharded with (jaxtx.sharding); the pages are then
        split over kv heads like the K/V projections, the rest of the engine state is replicated, and every step
        runs under the mesh."""
        if not isinstance(config, EngineConfig):
            raise ValueError(f"Engine: config={config!r}; expected an EngineConfig")
        mcfg = model.cfg
        if mcfg.kind != "decoder":
            raise ValueError(f"Engine: model kind {mcfg.kind!r} is not served by the engine (decoder-only models; "
                             "T5 and BERT keep jaxtx.infer.generate / embed)")
        self.adapter_slots = _adapter_slots(adapters)  # name -> slot (1..A); slot 0 is the base
        if self.adapter_slots:
            from jaxtx import lora
            params = lora.stack_adapters(model, params, list(adapters.values()))
        self.model, self.params, self.config = model, params, config
        self.vocab_size = mcfg.vocab_size
        limit = mcfg.max_seq_len if mcfg.position == "learned" else None
        pool = config.num_pages * config.page_size
        max_len = config.max_model_len or min(x for x in (limit, pool) if x is not None)
        if limit is not None and max_len > limit:
            raise ValueError(f"EngineConfig.max_model_len={max_len} exceeds the model's learned position table "
                             f"(max_seq_len={limit})")
        self.max_model_len = max_len
        self.pages_per_seq = -(-max_len // config.page_size)
        self.sched = Scheduler(config, window=mcfg.window, max_model_len=max_len)
        if cache is None:
            from jaxtx.paged_cache import PagedKVCache
            cache = PagedKVCache.init(mcfg, config.num_pages, config.page_size, quantize=config.quantize_kv)
        R, V = config.max_seqs, mcfg.vocab_size
        self.state = step_lib.DeviceState(cache, jnp.zeros((R, V), bool), jnp.zeros((R, V), jnp.int32))
        if (mesh is None) != (rules is None):
            raise ValueError("Engine: pass mesh and rules together (the ones the params are sharded with)")
        self._mesh = (mesh, rules)
        if mesh is not None:
            self.state = _place(self.state, mesh, rules)
            if self.adapter_slots:  # small: replicated beside the sharded base once, not moved to the mesh per step
                self.params = _replicate_adapters(self.params, mesh)
        self.kv_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
        self._step, self._loop = _jitted(model)
        self._lock = threading.Lock()
        self._incoming: list = []
        self._aborts: list = []
        self._live_ids: set = set()
        self._ids = itertools.count()
        self._requests: dict = {}
        self._generated = 0
        self._warm = False
        self.multi_steps = 0  # decode loops run (for tests / benchmarks)
        if warmup:
            self.warmup()

    # ------------------------------------------------------------------------------------------------ warm-up
    def warmup(self) -> None:
        """Compile (by running on all-padding inputs) every token bucket and decode-loop bucket."""
        cfg = self.config
        for N in cfg.token_buckets():
            for all_logits in ((False, True) if cfg.prompt_logprobs else (False,)):
                self._run_single(self._empty_inputs(N), all_logits)
        if cfg.decode_steps > 1:
            for N in cfg.decode_buckets():
                self._run_loop(self._empty_inputs(N), np.full((cfg.max_seqs, MAX_DEVICE_STOP_IDS), -1, np.int32),
                               np.zeros(cfg.max_seqs, np.int32))
        seen = np.zeros(self.vocab_size, bool)
        with self._under_mesh():
            self.state = _set_penalty_row(self.state, np.int32(0), seen, np.zeros(self.vocab_size, np.int32))
        self._warm = True

    def compiled(self) -> int:
        """Executables compiled by this engine's jitted functions (a test checks it does not grow after warm-up)."""
        return self._step._cache_size() + self._loop._cache_size() + _set_penalty_row._cache_size()

    # ------------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt_ids, *, max_new_tokens: int, sampling: Sampling = GREEDY, seed: Optional[int] = None,
                    stop=None, eos_id=None, logprobs: Optional[int] = None, prompt_logprobs: bool = False,
                    allowed_tokens: Optional[Callable] = None, cache_salt: Optional[str] = None,
                    request_id: Optional[str] = None, adapter: Optional[str] = None) -> str:
        """Queue a request; returns its id. Raises ValueError for bad arguments or a request that can never fit.
        adapter: the name of one of the engine's LoRA adapters (None = the base)."""
        if adapter is not None and adapter not in self.adapter_slots:
            raise ValueError(f"adapter={adapter!r}: not one of this engine's LoRA adapters "
                             f"{sorted(self.adapter_slots)} (None = the base model)")
        prompt = [int(t) for t in np.asarray(prompt_ids, np.int64).reshape(-1)]
        try:
            prompts_lib.validate([np.asarray(prompt)], self.vocab_size, None)
        except prompts_lib.PromptError as e:
            raise ValueError(str(e)) from None
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
        if not isinstance(sampling, Sampling):
            raise ValueError(f"sampling={sampling!r}: expected a jaxtx.infer.Sampling")
        total = len(prompt) + int(max_new_tokens)
        if total > self.max_model_len:
            raise ValueError(f"request of {len(prompt)} prompt + {max_new_tokens} new tokens = {total} exceeds "
                             f"max_model_len={self.max_model_len}")
        need = self.sched.max_pages(total)
        if need > self.config.num_pages:
            raise ValueError(f"request of {total} tokens needs {need} pages of {self.config.page_size} but the pool "
                             f"has num_pages={self.config.num_pages}: it can never fit")
        if logprobs is not None and not (0 <= int(logprobs) <= self.config.max_logprobs):
            raise ValueError(f"logprobs={logprobs!r}: must be in [0, EngineConfig.max_logprobs="
                             f"{self.config.max_logprobs}]")
        if prompt_logprobs and not self.config.prompt_logprobs:
            raise ValueError("prompt_logprobs=True: the engine was built without EngineConfig(prompt_logprobs=True)")
        if allowed_tokens is not None and not callable(allowed_tokens):
            raise ValueError(f"allowed_tokens={allowed_tokens!r}: expected a callable(generated_ids) -> bitmask")
        stop_seqs = _stop_seqs(stop, eos_id, self.vocab_size)
        seed = secrets.randbits(32) if seed is None else int(seed)
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed={seed}: must be in [0, 2**32)")
        with self._lock:
            rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._live_ids:
                raise ValueError(f"request_id={rid!r} is already in use")
            self._live_ids.add(rid)
            self._incoming.append(Request(rid, prompt, int(max_new_tokens), sampling, seed, stop_seqs,
                                          None if logprobs is None else int(logprobs), bool(prompt_logprobs),
                                          allowed_tokens, cache_salt, adapter,
                                          self.adapter_slots.get(adapter, 0)))
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(str(request_id))

    def has_work(self) -> bool:
        with self._lock:
            if self._incoming or self._aborts:
                return True
        return bool(self.sched.running or self.sched.waiting)

    def stats(self) -> dict:
        return {**self.sched.stats(), "generated_tokens": self._generated, "kv_bytes": self.kv_bytes,
                "compiled": self.compiled(), "decode_loops": self.multi_steps, "adapters": len(self.adapter_slots)}

    def _drain(self) -> list:
        with self._lock:
            incoming, aborts = self._incoming, self._aborts
            self._incoming, self._aborts = [], []
        for req in incoming:
            self._requests[req.id] = req
            self.sched.waiting.append(req)
        events = []
        for rid in aborts:
            req = self._requests.get(rid)
            if req is None:
                continue
            if req in self.sched.running:
                self.sched.running.remove(req)
            elif req in self.sched.waiting:
                self.sched.waiting.remove(req)
            self.sched.release(req)
            events.append(self._finish(req, "abort", 0, []))
        return events

    def _finish(self, req: Request, reason: str, stop_len: int, tokens, lps=None, tops=None, plp=None) -> Event:
        self._requests.pop(req.id, None)
        with self._lock:
            self._live_ids.discard(req.id)
        return Event(req.id, list(tokens), lps, tops, plp, True, reason, len(req.prompt), req.cached_tokens,
                     stop_len)

    # ------------------------------------------------------------------------------------------------ stepping
    def step(self) -> list:
        """One scheduling round: the events (new tokens, finished requests) it produced."""
        if not self._warm:
            self.warmup()
        events = self._drain()
        if not (self.sched.running or self.sched.waiting):
            return events
        if self._loop_ready():
            loop_events = self._decode_loop()
            if loop_events is not None:
                return events + loop_events
        out = self.sched.schedule()
        if not out.seqs:
            return events
        for s in out.seqs:
            if not s.req.row_set:
                self._set_row(s.req)
        masks = {}
        for sq in list(out.seqs):  # user callables run before the step; one that fails ends only its request
            if sq.sample and sq.req.allowed_tokens is not None:
                try:
                    masks[sq.req.id] = self._allowed(sq.req)
                except Exception as e:  # noqa: BLE001 (any error of the callable)
                    out.seqs.remove(sq)
                    self.sched.running.remove(sq.req)
                    self.sched.release(sq.req)
                    ev = self._finish(sq.req, "abort", 0, [])
                    events.append(dataclasses.replace(ev, error=f"allowed_tokens failed: {e}"))
        if not out.seqs:
            return events
        need_prompt_lp = any(s.req.prompt_logprobs and not s.req.prompt_lp_sent for s in out.seqs)
        inp = self._inputs(out, masks)
        o = self._run_single(inp, need_prompt_lp)
        tokens, lp = np.asarray(o.tokens), np.asarray(o.logprob)
        top_ids, top_lp = np.asarray(o.top_ids), np.asarray(o.top_logprobs)
        plp = None if o.prompt_logprobs is None else np.asarray(o.prompt_logprobs)
        off = 0
        for r, s in enumerate(out.seqs):
            req = s.req
            if plp is not None and req.prompt_logprobs and not req.prompt_lp_sent:
                start, L = req.num_computed, len(req.prompt)
                req.prompt_lp += plp[off: off + max(0, min(start + s.n, L - 1) - start)].tolist()
            off += s.n
        self.sched.finish_step(out)
        for r, s in enumerate(out.seqs):
            if s.sample:
                events.append(self._emit(s.req, [int(tokens[r])], [float(lp[r])], [top_ids[r]], [top_lp[r]]))
        return events

    def _set_row(self, req: Request) -> None:
        """A newly admitted request's penalty row (only requests with penalties read it)."""
        req.row_set = True
        if not req.sampling.penalized:
            return
        seen = np.zeros(self.vocab_size, bool)
        seen[req.all_tokens] = True
        counts = np.bincount(np.asarray(req.output, np.int64), minlength=self.vocab_size).astype(np.int32)
        with self._under_mesh():
            self.state = _set_penalty_row(self.state, np.int32(req.slot), seen, counts)

    def _emit(self, req: Request, toks, lps, top_ids, top_lps) -> Event:
        """Append sampled tokens to req (stopping at the first stop condition) -> its event."""
        new, new_lp, new_top, reason, stop_len = [], [], [], None, 0
        for t, l, ti, tl in zip(toks, lps, top_ids, top_lps):
            req.output.append(t)
            new.append(t)
            new_lp.append(l)
            n = req.logprobs or 0
            new_top.append({int(a): float(b) for a, b in zip(ti[:n], tl[:n])})
            reason, stop_len = self._stopped(req)
            if reason is not None:
                break
        self._generated += len(new)
        plp = None
        if req.prompt_logprobs and not req.prompt_lp_sent:
            plp, req.prompt_lp_sent = [None] + req.prompt_lp, True
        lps = new_lp if req.logprobs is not None else None
        tops = new_top if req.logprobs else None
        if reason is not None:
            if req in self.sched.running:
                self.sched.running.remove(req)
            self.sched.release(req)
            return self._finish(req, reason, stop_len, new, lps, tops, plp)
        return Event(req.id, new, lps, tops, plp, False, None, len(req.prompt), req.cached_tokens, 0)

    def _stopped(self, req: Request):
        out = req.output
        matched = [len(s) for s in req.stop_seqs if len(out) >= len(s) and out[-len(s):] == s]
        if matched:
            return "stop", max(matched)
        if len(out) >= req.max_new_tokens or req.num_tokens >= self.max_model_len:
            return "length", 0
        return None, 0

    # ------------------------------------------------------------------------------------------------ inputs
    def _empty_inputs(self, N: int) -> step_lib.StepInputs:
        R = self.config.max_seqs
        return step_lib.StepInputs(
            ids=np.zeros(N, np.int32), positions=np.full(N, -1, np.int32), slot_mapping=np.full(N, -1, np.int32),
            page_table=np.zeros((R, self.pages_per_seq), np.int32), kv_lens=np.zeros(R, np.int32),
            cu_q_lens=np.zeros(R + 1, np.int32), num_seqs=np.int32(0), logits_at=np.zeros(R, np.int32),
            sample=np.zeros(R, bool), slots=np.arange(R, dtype=np.int32), params=sb.RowParams.host(R),
            allowed=np.full((R, sb.words(self.vocab_size)), -1, np.int32), targets=np.zeros(N, np.int32),
            adapters=np.zeros(N, np.int32) if self.adapter_slots else None)

    def _inputs(self, out: ScheduleOutput, masks=None) -> step_lib.StepInputs:
        ps = self.config.page_size
        inp = self._empty_inputs(self.config.bucket(out.num_tokens))
        off = 0
        for r, s in enumerate(out.seqs):
            req, n = s.req, s.n
            start = req.num_computed
            toks = req.all_tokens
            pos = np.arange(start, start + n)
            pages = np.maximum(np.asarray(req.pages, np.int32), 0)
            inp.ids[off:off + n] = toks[start:start + n]
            inp.positions[off:off + n] = pos
            inp.slot_mapping[off:off + n] = pages[pos // ps] * ps + pos % ps
            inp.page_table[r, :len(pages)] = pages
            inp.kv_lens[r] = start + n
            inp.cu_q_lens[r + 1] = off + n
            inp.logits_at[r] = off + n - 1
            inp.sample[r] = s.sample
            inp.slots[r] = req.slot
            if inp.adapters is not None:
                inp.adapters[off:off + n] = req.adapter_slot
            sb.set_row(inp.params, r, req.sampling, req.seed, len(req.output))
            if req.prompt_logprobs:
                nxt = toks[start + 1:start + n + 1]
                inp.targets[off:off + len(nxt)] = nxt
            if masks and req.id in masks:
                inp.allowed[r] = masks[req.id]
            off += n
        inp.cu_q_lens[len(out.seqs) + 1:] = off
        return inp._replace(num_seqs=np.int32(len(out.seqs)))

    def _allowed(self, req: Request) -> np.ndarray:
        mask = req.allowed_tokens(list(req.output))
        W = sb.words(self.vocab_size)
        if mask is None:
            return np.full(W, -1, np.int32)
        mask = np.asarray(mask)
        if mask.shape != (W,):
            raise ValueError(f"request {req.id}: allowed_tokens returned shape {mask.shape}; expected ({W},) "
                             f"packed int32 words (ceil(vocab_size / 32))")
        return mask.astype(np.uint32).view(np.int32) if mask.dtype != np.int32 else mask

    def _under_mesh(self):
        from jaxtx import sharding
        mesh, rules = self._mesh
        return contextlib.nullcontext() if mesh is None else sharding.use_mesh(mesh, rules)

    def _run_single(self, inp, all_logits):
        with self._under_mesh():
            self.state, out = self._step(self.params, self.state, inp, all_logits=all_logits,
                                         n_top=self.config.max_logprobs)
        return out

    def _run_loop(self, inp, stop_ids, remaining):
        cfg = self.config
        with self._under_mesh():
            self.state, out = self._loop(self.params, self.state, inp, stop_ids, remaining, steps=cfg.decode_steps,
                                         n_top=cfg.max_logprobs, page_size=cfg.page_size)
        return out

    # ------------------------------------------------------------------------------------------------ decode loop
    def _loop_ready(self) -> bool:
        s = self.sched
        return (self.config.decode_steps > 1 and not s.waiting and bool(s.running)
                and all(r.decoding and r.allowed_tokens is None for r in s.running))

    def _decode_loop(self) -> Optional[list]:
        """Several decode steps in one program; None when the pages for them are not free (a single step runs)."""
        cfg, s = self.config, self.sched
        k = cfg.decode_steps
        reqs = list(s.running)
        rem = [min(k, r.max_new_tokens - len(r.output)) for r in reqs]
        need = sum(max(0, -(-(r.num_computed + m) // cfg.page_size) - len(r.pages)) for r, m in zip(reqs, rem))
        if need > s.alloc.num_free:
            return None
        for r, m in zip(reqs, rem):
            if not s._grow(r, r.num_computed + m):  # cannot happen: `need` pages were free
                raise RuntimeError(f"engine: request {r.id} could not get the pages counted free for the decode loop")
            if not r.row_set:
                self._set_row(r)
        out = ScheduleOutput([Scheduled(r, 1, True) for r in reqs], [])
        inp = self._inputs(out)
        stop_ids = np.full((cfg.max_seqs, MAX_DEVICE_STOP_IDS), -1, np.int32)
        remaining = np.zeros(cfg.max_seqs, np.int32)
        for i, (r, m) in enumerate(zip(reqs, rem)):
            ids = r.stop_token_ids[:MAX_DEVICE_STOP_IDS]
            stop_ids[i, :len(ids)] = ids
            remaining[i] = m
        o = self._run_loop(inp, stop_ids, remaining)
        self.multi_steps += 1
        toks, lps = np.asarray(o.tokens), np.asarray(o.logprob)
        top_ids, top_lps = np.asarray(o.top_ids), np.asarray(o.top_logprobs)
        events = []
        for i, r in enumerate(reqs):
            col = toks[:, i]
            m = int(np.sum(col >= 0))
            r.num_computed += m  # the pending token and the m - 1 sampled ones fed back
            events.append(self._emit(r, col[:m].tolist(), lps[:m, i].tolist(), top_ids[:m, i], top_lps[:m, i]))
            if r in s.running:
                s.register_full_pages(r)
                s.free_out_of_window(r)
        return events

    # ------------------------------------------------------------------------------------------------ generate
    def generate(self, prompts, *, max_new_tokens: int, sampling: Sampling = GREEDY, seed=0, stop=None, eos_id=None,
                 return_logprobs: bool = False, adapter=None) -> Generation:
        """The same call and result as `jaxtx.infer.generate`, served by this engine (it drives step() itself, so
        do not run it while another thread serves). An int seed gives prompt b the seed `seed + b`. adapter: one
        adapter name (or None = the base) for every prompt, or a list with one per prompt (mixed in one batch)."""
        rows = prompts_lib.as_rows(prompts)
        seeds = prompts_lib.row_seeds(seed, len(rows), len(rows))
        names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(rows)
        if len(names) != len(rows):
            raise ValueError(f"adapter: {len(names)} names for {len(rows)} prompts")
        ids = [self.add_request(row, max_new_tokens=max_new_tokens, sampling=sampling, seed=int(sd), stop=stop,
                                eos_id=eos_id, logprobs=0 if return_logprobs else None, adapter=name)
               for row, sd, name in zip(rows, seeds, names)]
        got = {i: ([], []) for i in ids}
        done = {}
        while len(done) < len(ids):
            for ev in self.step():
                if ev.request_id in got:
                    got[ev.request_id][0].extend(ev.token_ids)
                    got[ev.request_id][1].extend(ev.logprobs or [])
                    if ev.finished:
                        done[ev.request_id] = ev
        toks, lps, reasons = [], [], []
        for i in ids:
            t, l = got[i]
            k = len(t) - done[i].stop_len
            toks.append(t[:k])
            lps.append(l[:k])
            reasons.append(done[i].finish_reason)
        return Generation(toks, reasons, lps if return_logprobs else None)


def _place(state, mesh, rules):
    """Pages split over kv heads (the axis before [P, page_size, Hd] of K/V, before [P, page_size] of scales) as the
    rules split the K/V projections; everything else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtx import sharding

    def one(path, a):
        name = "/".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path)
        if "cache" not in name or a.ndim < 3:
            return jax.device_put(a, NamedSharding(mesh, PartitionSpec()))
        head = a.ndim - (3 if "scale" in name else 4)
        names = [None] * a.ndim
        names[head] = "kv_heads"
        spec = sharding.logical_to_spec(names, rules, mesh, shape=a.shape, what=f"engine page pool {name}")
        return jax.device_put(a, NamedSharding(mesh, spec))
    return jax.tree_util.tree_map_with_path(one, state)


def _replicate_adapters(params, mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtx import lora
    return lora.combine(lora.strip(params), jax.device_put(lora.adapters(params), NamedSharding(mesh, PartitionSpec())))


def _adapter_slots(adapters) -> dict:
    """{name: slot 1..A} in the given order, names checked."""
    if adapters is None:
        return {}
    if not hasattr(adapters, "items"):
        raise ValueError(f"Engine: adapters={type(adapters).__name__}; expected a mapping {{name: LoRA params}}")
    for name in adapters:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Engine: adapter name {name!r}: expected a non-empty string")
    return {name: i + 1 for i, name in enumerate(adapters)}


def _stop_seqs(stop, eos_id, vocab_size: int) -> list:
    items = list(stop or [])
    if eos_id is not None:
        items += [int(e) for e in np.atleast_1d(eos_id)]
    out = []
    for s in items:
        if isinstance(s, str):
            raise ValueError(f"stop={s!r}: strings need a tokenizer; pass token ids or token-id sequences")
        seq = [int(s)] if np.ndim(s) == 0 else [int(t) for t in s]
        if any(not 0 <= t < vocab_size for t in seq):
            raise ValueError(f"stop sequence {seq}: token ids must be in [0, {vocab_size})")
        if seq:
            out.append(seq)
    return out
