"""jaxtx.infer.engine: the serving engine (paged KV cache, continuous batching, chunked prefill, prefix caching,
preemption, per-request sampling). See engine.py for the API and scheduler.py for the policy."""
from jaxtx.infer.engine.config import EngineConfig
from jaxtx.infer.engine.engine import Engine, Event
from jaxtx.infer.engine.pages import PageAllocator, page_hashes

__all__ = ["Engine", "EngineConfig", "Event", "PageAllocator", "page_hashes"]
