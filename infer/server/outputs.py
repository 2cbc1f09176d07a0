"""One generated sequence (an OpenAI choice) as the server assembles it from engine events: text deltas that never
split a character nor leak the start of a stop string, stop-string matching on the decoded text, and logprobs in both
OpenAI layouts (completions: tokens / token_logprobs / top_logprobs / text_offset; chat: content[{token, logprob,
bytes, top_logprobs}])."""
from __future__ import annotations

from typing import Optional, Sequence

from jaxtx.infer.server import schemas
from jaxtx.infer.server.tokenizer import IncrementalDecoder, Tokenizer


class Choice:
    """Accumulates one sequence's events. `add(event)` returns the text that may be shown now."""

    def __init__(self, index: int, request_id: str, tokenizer: Tokenizer, prompt_ids: Sequence[int], *,
                 stop: Optional[Sequence[str]] = None, discard_output: bool = False):
        self.index, self.request_id, self.tok = index, request_id, tokenizer
        self.prompt_ids = list(prompt_ids)
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stops = list(stop or [])
        self.discard = discard_output  # echo with max_tokens=0: one token is generated for the engine, none shown
        self.text = ""  # all text released so far
        self._pending = ""  # decoded but held back: it may be the start of a stop string
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: Optional[list] = None
        self.finish_reason: Optional[str] = None
        self.cached_tokens = 0
        self.first = True  # the next chunk is this choice's first (chat: it carries the role)
        self.first_of_prompt = True  # the first of the n choices of its prompt (usage counts a prompt once)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, ev) -> str:
        """Apply one engine event; returns newly releasable text. Sets finish_reason when the sequence ends (by the
        engine, or by a stop string: the caller must then abort the engine request)."""
        if self.finished:
            return ""
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = list(ev.prompt_logprobs)
        self.cached_tokens = max(self.cached_tokens, ev.cached_tokens or 0)
        ids = list(ev.token_ids)
        if ev.finished and ev.finish_reason == "stop":
            # the EOS that ended the sequence is not part of the answer (OpenAI never shows it); the server passes
            # only single-token stops (EOS) to the engine, so the stop is within this event
            cut = min(getattr(ev, "stop_len", 0), len(ids))
            ids = ids[: len(ids) - cut]
        n_before = len(self.token_ids)
        if not self.discard:
            self.token_ids += ids
            if ev.logprobs is not None:
                self.logprobs += list(ev.logprobs)[: len(ids)]
            if ev.top_logprobs is not None:
                self.top_logprobs += list(ev.top_logprobs)[: len(ids)]
        out = self._release(self.decoder.push(self.token_ids[n_before:]) if ids and not self.discard else "")
        if self.finished:  # a stop string matched
            return out
        if ev.finished:
            self.finish_reason = "length" if self.discard else ("stop" if ev.finish_reason == "stop" else
                                                                "length" if ev.finish_reason == "length" else
                                                                ev.finish_reason)
            out += self._release(self.decoder.flush(), final=True)
        return out

    def _release(self, delta: str, final: bool = False) -> str:
        if not self.stops:
            self.text += delta
            return delta
        self._pending += delta
        # a stop string may straddle released text and the new delta: search from where it could start
        longest = max(map(len, self.stops))
        window_start = max(0, len(self.text) - longest + 1)
        hay = self.text[window_start:] + self._pending
        hits = [i for i in (hay.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = window_start + min(hits)  # position in text + pending
            whole = self.text + self._pending
            out = whole[len(self.text):cut] if cut > len(self.text) else ""
            self.text = whole[:max(cut, len(self.text))]
            self._pending = ""
            self.finish_reason = "stop"
            return out
        hold = 0 if final else _partial_stop(self.text + self._pending, self.stops, len(self._pending))
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold:]
        self.text += out
        return out

    # ---------------------------------------------------------------------------------------------- logprobs
    def _tops(self, i: int) -> dict[int, float]:
        return self.top_logprobs[i] if i < len(self.top_logprobs) and self.top_logprobs[i] is not None else {}

    def completion_logprobs(self, start: int, end: int, *, echo_prompt: bool,
                            offset0: int) -> schemas.CompletionLogprobs:
        """Completions layout for generated tokens [start, end), with the prompt's tokens first when echo_prompt."""
        out = schemas.CompletionLogprobs()
        offset = offset0
        rows = []
        if echo_prompt:
            lps = self.prompt_logprobs or [None] * len(self.prompt_ids)
            for t, lp in zip(self.prompt_ids, lps):
                rows.append((t, lp, None if lp is None else {self.tok.token_str(t): lp}))
        for i in range(start, min(end, len(self.logprobs))):
            t = self.token_ids[i]
            top = {self.tok.token_str(a): b for a, b in self._tops(i).items()}
            top.setdefault(self.tok.token_str(t), self.logprobs[i])
            rows.append((t, self.logprobs[i], top))
        for t, lp, top in rows:
            s = self.tok.token_str(t)
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def chat_logprobs(self, start: int, end: int) -> schemas.ChoiceLogprobs:
        content = []
        for i in range(start, min(end, len(self.logprobs))):
            t = self.token_ids[i]
            tops = [schemas.TopLogprob(token=self.tok.token_str(a), logprob=b, bytes=list(self.tok.token_bytes(a)))
                    for a, b in sorted(self._tops(i).items(), key=lambda kv: -kv[1])]
            content.append(schemas.TokenLogprob(token=self.tok.token_str(t), logprob=self.logprobs[i],
                                          bytes=list(self.tok.token_bytes(t)), top_logprobs=tops))
        return schemas.ChoiceLogprobs(content=content)


def _partial_stop(text: str, stops: Sequence[str], limit: int) -> int:
    """Length of the longest suffix of `text` (at most `limit` chars) that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text), limit), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best
