"""A stand-in that keeps the engine contract (engine_contract.md) for the HTTP-layer tests that run in-process.

Its "model" is a fixed random bigram table: logits of the next token depend on the previous token only, so greedy
outputs, sampled outputs (per-request seed), log-probs and prompt log-probs all have closed-form references
(`reference_*`). It honours allowed_tokens, eos ids, max_new_tokens, abort, and reports pages like a paged engine.
"""
import dataclasses
import threading
import time

import numpy as np

PAGE = 16


@dataclasses.dataclass(frozen=True)
class Event:
    request_id: str
    token_ids: list
    logprobs: list = None
    top_logprobs: list = None
    prompt_logprobs: list = None
    finished: bool = False
    finish_reason: str = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    stop_len: int = 0


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


class FakeEngine:
    def __init__(self, vocab, *, seed=0, tokens_per_step=1, pages_total=256, hold=False, step_s=0.003):
        self.V = vocab
        self.table = np.random.default_rng(seed).normal(0, 3.0, (vocab, vocab)).astype(np.float64)
        self.tokens_per_step = tokens_per_step
        self.pages_total = pages_total
        self.hold = hold  # never produce tokens (queue-full and disconnect tests)
        self.step_s = step_s  # a step takes time, as a device step does (the server must keep up between steps)
        self._lock = threading.Lock()
        self._incoming, self._aborts = [], []
        self.running = {}
        self.aborted = []
        self.generated = 0
        self.seen_prompts = []

    # the contract --------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids, *, max_new_tokens, sampling=None, seed=None, stop=None, eos_id=None,
                    logprobs=None, prompt_logprobs=False, allowed_tokens=None, cache_salt=None, request_id=None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        eos = [] if eos_id is None else list(np.atleast_1d(eos_id))
        req = dict(id=request_id, prompt=list(prompt_ids), max_new=max_new_tokens, sampling=sampling, seed=seed,
                   eos=eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs, allowed=allowed_tokens, out=[],
                   first=True)
        with self._lock:
            self._incoming.append(req)
            self.seen_prompts.append(list(prompt_ids))
        return request_id

    def abort(self, request_id):
        with self._lock:
            self._aborts.append(request_id)

    def has_work(self):
        with self._lock:
            return bool(self._incoming or self._aborts or (self.running and not self.hold))

    def stats(self):
        used = sum(-(-(len(r["prompt"]) + len(r["out"])) // PAGE) for r in self.running.values())
        return dict(pages_total=self.pages_total, pages_used=used, pages_cached_free=0, running=len(self.running),
                    waiting=0, prefix_cached_tokens=0, generated_tokens=self.generated)

    def step(self):
        with self._lock:
            incoming, aborts = self._incoming, self._aborts
            self._incoming, self._aborts = [], []
        for r in incoming:
            self.running[r["id"]] = r
        events = []
        for rid in aborts:
            if self.running.pop(rid, None) is not None:
                self.aborted.append(rid)
                events.append(Event(rid, [], finished=True, finish_reason="abort"))
        if self.hold:
            return events
        time.sleep(self.step_s)
        for rid, r in list(self.running.items()):
            ev = self._advance(r)
            events.append(ev)
            if ev.finished:
                del self.running[rid]
        return events

    # the model -----------------------------------------------------------------------------------------------
    def logits(self, prev):
        return self.table[prev]

    def _advance(self, r):
        new, lps, tops, reason, stop_len = [], [], [], None, 0
        for _ in range(self.tokens_per_step):
            ctx = r["prompt"] + r["out"]
            logits = self.logits(ctx[-1]).copy()
            if r["allowed"] is not None:
                mask = r["allowed"](list(r["out"]))
                bits = np.unpackbits(np.asarray(mask, np.int32).view(np.uint8), bitorder="little")[: self.V]
                logits[bits == 0] = -np.inf
            lp = log_softmax(self.logits(ctx[-1]))
            s = r["sampling"]
            if s is None or s.temperature == 0:
                t = int(np.argmax(logits))
            else:
                rng = np.random.default_rng([r["seed"], len(r["out"])])
                p = np.exp(log_softmax(logits / s.temperature))
                t = int(rng.choice(self.V, p=p / p.sum()))
            r["out"].append(t)
            new.append(t)
            lps.append(float(lp[t]))
            k = r["logprobs"] or 0
            tops.append({int(i): float(lp[i]) for i in np.argsort(-lp)[:k]})
            if t in r["eos"]:
                reason, stop_len = "stop", 1
                break
            if len(r["out"]) >= r["max_new"]:
                reason = "length"
                break
        self.generated += len(new)
        plp = None
        if r["prompt_logprobs"] and r["first"]:
            p = r["prompt"]
            plp = [None] + [float(log_softmax(self.logits(p[i - 1]))[p[i]]) for i in range(1, len(p))]
        r["first"] = False
        return Event(r["id"], new, lps if r["logprobs"] is not None else None, tops if r["logprobs"] else None, plp,
                     reason is not None, reason, len(r["prompt"]), 0, stop_len)

    def reference_greedy(self, prompt, n, eos=()):
        out = []
        for _ in range(n):
            t = int(np.argmax(self.logits((prompt + out)[-1])))
            if t in eos:
                break
            out.append(t)
        return out
