"""The engine in its own thread, and the hand-off of its events to the asyncio tasks that serve requests.

The HTTP side registers a sink (a callable run on the event loop) under a request id it chose, then adds the request,
so no event can arrive before its sink exists. The thread steps the engine while it has work and sleeps on a wake-up
event otherwise; after every step it hands that step's events to the loop with one `call_soon_threadsafe` (one
wake-up of the loop per step, not one per token) and snapshots engine.stats(), so the HTTP side never reads engine
state from another thread (only add_request and abort are thread-safe in the engine contract).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from typing import Callable, Optional

log = logging.getLogger("jaxtx.serve")


class EngineDied:
    """Delivered to every sink when engine.step() raised: the requests end with a server error."""

    def __init__(self, message: str):
        self.message = message


class EngineLoop:
    def __init__(self, engine, idle_poll_s: float = 0.5):
        self.engine = engine
        self.idle_poll_s = idle_poll_s
        self._sinks: dict[str, Callable] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stats: dict = {}
        self.error: Optional[str] = None
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="jaxtx-engine", daemon=True)

    # ---------------------------------------------------------------------------------------------- loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._refresh_stats()
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return len(self._sinks)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def submit(self, request_id: str, sink: Callable, prompt_ids, **kwargs) -> None:
        """Register the sink, then add the request (add_request's ValueError propagates: a 400 for the caller)."""
        if self.error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self.error}")
        with self._lock:
            self._sinks[request_id] = sink
        try:
            self.engine.add_request(prompt_ids, request_id=request_id, **kwargs)
        except BaseException:
            with self._lock:
                self._sinks.pop(request_id, None)
            raise
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop delivering this request's events and free its pages (the engine drops it at its next step)."""
        with self._lock:
            known = self._sinks.pop(request_id, None) is not None
        if known:
            self.engine.abort(request_id)
            self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything still running (its waiters get EngineDied), then end the thread. Runs on the loop."""
        with self._lock:
            sinks, self._sinks = dict(self._sinks), {}
        for rid, sink in sinks.items():
            self.engine.abort(rid)
            sink(EngineDied("the server is shutting down"))
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _deliver(self, events) -> None:  # runs on the event loop
        for ev in events:
            if isinstance(ev, EngineDied):
                with self._lock:
                    sinks, self._sinks = list(self._sinks.values()), {}
                for sink in sinks:
                    sink(ev)
                continue
            sink = self._sinks.get(ev.request_id)
            if sink is None:  # aborted by the server (stop string, disconnect): its late events are dropped
                continue
            if ev.finished:
                with self._lock:
                    self._sinks.pop(ev.request_id, None)
            sink(ev)

    # ---------------------------------------------------------------------------------------------- thread side
    def _refresh_stats(self) -> None:
        try:
            self.stats = dict(self.engine.stats())
        except Exception:  # stats are informational: never let them stop the loop
            log.exception("engine.stats() failed")

    def _run(self) -> None:
        last_stats = 0.0
        while not self._stopping:
            self._wake.clear()  # before has_work: a submit after this point sets it again and the wait returns
            try:
                busy = self.engine.has_work()
                events = self.engine.step() if busy else []
            except Exception as e:  # a broken engine must not leave clients waiting forever
                self.error = f"{type(e).__name__}: {e}"
                log.error("engine step failed:\n%s", traceback.format_exc())
                self.loop.call_soon_threadsafe(self._deliver, [EngineDied(self.error)])
                return
            self.steps += busy
            if events:
                self.loop.call_soon_threadsafe(self._deliver, events)
            now = time.monotonic()
            if not busy or now - last_stats > 0.05:
                self._refresh_stats()
                last_stats = now
            if not busy:
                self._wake.wait(self.idle_poll_s)
            else:
                time.sleep(0)  # release the GIL between steps: the event loop streams this step's tokens meanwhile
        self._refresh_stats()
