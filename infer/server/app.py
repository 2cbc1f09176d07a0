"""The OpenAI-compatible HTTP API over the engine (FastAPI):

    POST /v1/completions   POST /v1/chat/completions   GET /v1/models   GET /health   GET /metrics

`create_app(engine, tokenizer, ServeConfig(...))` returns the ASGI app; `jaxtx serve` runs it under uvicorn. Every
request is validated (schemas.py) and checked against the model (name, prompt length, token ids, grammar) before it
reaches the engine, so bad input is a 4xx in OpenAI's error shape, never a 500. Each choice is one engine request;
its events arrive on the request's asyncio queue (runner.py). A stop string, a client disconnect or shutdown aborts
the engine request, which frees its pages.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from contextlib import asynccontextmanager
from typing import Optional

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from jaxtx.sampling import Sampling
from jaxtx.infer.server import chat_template, schemas, structured
from jaxtx.infer.server.metrics import Metrics
from jaxtx.infer.server.outputs import Choice
from jaxtx.infer.server.runner import EngineDied, EngineLoop
from jaxtx.infer.server.tokenizer import Tokenizer

log = logging.getLogger("jaxtx.serve")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_name: str
    max_model_len: int  # prompt + completion tokens of one sequence
    model_vocab: int  # ids the model embeds (>= the tokenizer's pieces when the embedding is padded)
    api_key: Optional[str] = None
    max_queue: int = 512  # sequences in flight (running + waiting) before new requests get 503
    adapters: tuple = ()  # ((name, source dir), ...): LoRA adapters served over the base; a request's `model` picks one

    def __post_init__(self):
        for name in ("max_model_len", "model_vocab", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name}={getattr(self, name)}: must be >= 1")


class APIError(Exception):
    """Answered as {"error": {message, type, param, code}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = ("invalid_request_error" if self.status < 500 and self.status not in (401, 429) else
                "authentication_error" if self.status == 401 else "rate_limit_error" if self.status == 429 else
                "server_error")
        body = schemas.ErrorBody(message=self.message, type=kind, param=self.param, code=self.code)
        return JSONResponse(schemas.ErrorResponse(error=body).model_dump(), status_code=self.status)


class _ClientGone(Exception):
    pass


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


class _Job:
    """The engine requests behind one HTTP request (one per choice) and the queue their events arrive on."""

    def __init__(self, runner: EngineLoop, choices: list[Choice]):
        self.runner, self.choices = runner, choices
        self.by_rid = {c.request_id: c for c in choices}
        self.queue: asyncio.Queue = asyncio.Queue()

    def submit(self, prompts: list[list[int]], kwargs: list[dict]) -> None:
        try:
            for c, ids, kw in zip(self.choices, prompts, kwargs):
                self.runner.submit(c.request_id, self.queue.put_nowait, ids, **kw)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for c in self.choices:
            if not c.finished:
                self.runner.abort(c.request_id)

    @property
    def done(self) -> bool:
        return all(c.finished for c in self.choices)

    async def next(self, request: Optional[Request]) -> list[tuple[Choice, str, int]]:
        """Waits for an event, then takes every event already queued, applied to their choices and merged per
        choice: [(choice, releasable text, its token count before these events)]. When the loop falls behind the
        engine, a stream sends one chunk for several steps instead of falling further behind."""
        while True:
            try:
                ev = await (asyncio.wait_for(self.queue.get(), 1.0) if request is not None else self.queue.get())
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _ClientGone() from None
                continue
            events = [ev]
            while not self.queue.empty():
                events.append(self.queue.get_nowait())
            merged: dict[str, list] = {}
            for ev in events:
                if isinstance(ev, EngineDied):
                    raise APIError(503 if "shutting down" in ev.message else 500, ev.message)
                c = self.by_rid[ev.request_id]
                if c.finished:  # events queued before a stop string ended it
                    continue
                m = merged.setdefault(ev.request_id, [c, "", len(c.token_ids)])
                m[1] += c.add(ev)
                if c.finish_reason == "stop" and not ev.finished:  # a stop string: the engine still runs it
                    self.runner.abort(c.request_id)
            if merged:
                return [tuple(m) for m in merged.values()]


def create_app(engine, tokenizer: Tokenizer, config: ServeConfig) -> FastAPI:
    runner = EngineLoop(engine)
    metrics = Metrics()
    compiler: list = []  # the llguidance tokenizer (built here: ~1 s for a 128k vocabulary, not on a request)
    try:
        compiler.append(structured.GuideCompiler(tokenizer, config.model_vocab))
    except ValueError as e:  # no EOS: structured requests will be refused with this reason
        log.warning("structured output unavailable: %s", e)

    @asynccontextmanager
    async def lifespan(app):
        runner.start(asyncio.get_running_loop())
        yield
        runner.stop()

    app = FastAPI(title="jaxtx", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runner, app.state.metrics, app.state.config = runner, metrics, config

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        metrics.request_done(_endpoint(request), e.status)
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        metrics.request_done(_endpoint(request), 400)
        return _validation_error(e).response()

    def auth(request: Request) -> None:
        if config.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    adapter_names = [name for name, _ in config.adapters]

    def check_model(name: str) -> Optional[str]:
        """The LoRA adapter a request's `model` names (None: the base); 404 for a model this server does not have."""
        if name == config.model_name:
            return None
        if name in adapter_names:
            return name
        served = ", ".join(f"`{m}`" for m in [config.model_name] + adapter_names)
        raise APIError(404, f"The model `{name}` does not exist (this server serves {served}).",
                       param="model", code="model_not_found")

    def check_prompt(ids: list[int], max_new: int, limit_param: str) -> None:
        if not ids:
            raise APIError(400, "prompt: the prompt is empty after tokenization; generation needs at least one "
                                "token to condition on", param="prompt")
        bad = [t for t in ids if not 0 <= t < config.model_vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {config.model_vocab})",
                           param="prompt")
        if len(ids) + max_new > config.max_model_len:
            raise APIError(400, f"This model's maximum context length is {config.max_model_len} tokens. However, "
                                f"you requested {len(ids) + max_new} tokens ({len(ids)} in the prompt, {max_new} for "
                                f"the completion). Please reduce the prompt or {limit_param}.",
                           param=limit_param, code="context_length_exceeded")

    def masks(req) -> tuple:
        """(constant logit_bias mask or None, grammar or None), checked."""
        bias_mask = None
        if req.logit_bias:
            allowed = np.ones(config.model_vocab, bool)
            forced = []
            for k, b in req.logit_bias.items():
                t = int(k)
                if not 0 <= t < config.model_vocab:
                    raise APIError(400, f"logit_bias: token id {t} is outside the vocabulary [0, "
                                        f"{config.model_vocab})", param="logit_bias")
                if b <= -100:
                    allowed[t] = False
                elif b >= 100:
                    forced.append(t)
                elif b != 0:
                    raise APIError(400, f"logit_bias: bias {b} for token {t} is not supported; only -100 (ban) and "
                                        "100 (allow only these tokens) are", param="logit_bias")
            if forced:
                allowed &= np.isin(np.arange(config.model_vocab), forced)
            if not allowed.any():
                raise APIError(400, "logit_bias: bans every token", param="logit_bias")
            packed = structured.pack(allowed)
            bias_mask = lambda ids: packed  # noqa: E731
        grammar = None
        if req.response_format is not None:
            try:
                grammar = structured.json_grammar(req.response_format.as_dict())
                if grammar is not None:
                    if not compiler:
                        compiler.append(structured.GuideCompiler(tokenizer, config.model_vocab))
                    compiler[0].check(grammar)
            except ValueError as e:
                raise APIError(400, str(e), param="response_format") from None
        return bias_mask, grammar

    def engine_kwargs(req, max_new: int, *, logprobs: Optional[int], prompt_logprobs: bool,
                      adapter: Optional[str]) -> dict:
        try:
            sampling = Sampling(
                temperature=float(1.0 if req.temperature is None else req.temperature),
                top_k=max(0, req.top_k or 0), top_p=float(1.0 if req.top_p is None else req.top_p),
                min_p=float(req.min_p or 0.0), repetition_penalty=float(req.repetition_penalty or 1.0),
                frequency_penalty=float(req.frequency_penalty or 0.0),
                presence_penalty=float(req.presence_penalty or 0.0))
        except ValueError as e:
            raise APIError(400, str(e).replace("Sampling.", "")) from None
        eos = list(tokenizer.eos_ids)
        kw = dict(max_new_tokens=max_new, sampling=sampling, eos_id=eos or None, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs)
        return kw if adapter is None else dict(kw, adapter=adapter)

    def make_job(req, prompts: list[list[int]], base_kwargs: dict, *, discard=False) -> _Job:
        n = req.n or 1
        if runner.in_flight + n * len(prompts) > config.max_queue:
            raise APIError(503, f"the server is at capacity ({config.max_queue} sequences in flight); retry later",
                           code="server_overloaded")
        if not runner.healthy:
            raise APIError(503, f"the engine is not running: {runner.error}")
        bias_mask, grammar = masks(req)
        seed0 = req.seed if req.seed is not None else random.getrandbits(31)  # choice j samples with seed0 + j
        choices, all_ids, kwargs = [], [], []
        for p, ids in enumerate(prompts):
            for j in range(n):
                rid = f"{uuid.uuid4().hex}"
                choices.append(Choice(p * n + j, rid, tokenizer, ids, stop=req.stop, discard_output=discard))
                choices[-1].first_of_prompt = j == 0
                try:
                    guide = structured.Guide(compiler[0], grammar) if grammar is not None else None
                except structured.GrammarError as e:
                    raise APIError(400, str(e), param="response_format") from None
                kw = dict(base_kwargs, seed=(seed0 + j) % 2**32, allowed_tokens=structured.combine(guide, bias_mask))
                all_ids.append(ids)
                kwargs.append(kw)
        job = _Job(runner, choices)
        try:
            job.submit(all_ids, kwargs)
        except ValueError as e:  # the engine's own checks (a request that can never fit, ...)
            raise APIError(400, str(e)) from None
        return job

    def usage(job: _Job, prompts: list[list[int]], n: int) -> schemas.Usage:
        """OpenAI counts each prompt once however many choices share it; cached tokens come from the prefix cache."""
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(len(c.token_ids) for c in job.choices)
        cached = sum(max(c.cached_tokens for c in job.choices[i * n:(i + 1) * n]) for i in range(len(prompts)))
        return schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion,
                       prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=cached))

    def account(job: _Job, endpoint: str, status: int, t0: float) -> None:
        metrics.request_done(endpoint, status, time.monotonic() - t0)
        metrics.prompt_tokens += sum(len(c.prompt_ids) for c in job.choices if c.first_of_prompt)
        metrics.completion_tokens += sum(len(c.token_ids) for c in job.choices)

    async def run(request, job, t0, endpoint, stream_body, final_body, stream: bool):
        """Stream SSE chunks, or wait for every choice and answer once."""
        if stream:
            async def gen():
                status = 200
                try:
                    async for chunk in stream_body():
                        yield chunk
                    yield "data: [DONE]\n\n"
                except APIError as e:  # the engine failed or the server is stopping mid-stream
                    status = e.status
                    yield f"data: {e.response().body.decode()}\n\n"
                finally:
                    job.abort()  # a disconnect cancels this generator: free the pages now
                    account(job, endpoint, status, t0)
            return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while not job.done:
                await job.next(request)
        except _ClientGone:
            job.abort()
            metrics.request_done(endpoint, 499)
            return Response(status_code=499)
        except BaseException:
            job.abort()
            raise
        account(job, endpoint, 200, t0)
        return Response(final_body().model_dump_json(), media_type="application/json")

    # ---------------------------------------------------------------------------------------------- routes
    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: schemas.CompletionRequest, request: Request):
        t0 = time.monotonic()
        adapter = check_model(req.model)
        texts, prompts = [], []
        for p in req.prompts():
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
            texts.append(p if isinstance(p, str) else tokenizer.decode(ids))
            prompts.append(ids)
        discard = req.max_tokens == 0  # echo-only scoring (lm-eval): one token is generated and dropped
        max_new = max(1, req.max_tokens if req.max_tokens is not None else 16)
        for ids in prompts:
            check_prompt(ids, max_new, "max_tokens")
        want_lp = req.logprobs is not None
        kw = engine_kwargs(req, max_new, logprobs=req.logprobs, prompt_logprobs=bool(req.echo and want_lp),
                           adapter=adapter)
        job = make_job(req, prompts, kw, discard=discard)
        n, cid, created = req.n or 1, f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo_text = lambda c: texts[c.index // n] if req.echo else ""  # noqa: E731

        def logprobs_of(c, start, end, first):
            if not want_lp:
                return None
            offset0 = 0 if req.echo else len(texts[c.index // n])
            return c.completion_logprobs(start, end, echo_prompt=bool(req.echo and first), offset0=offset0)

        async def stream_body():
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            while not job.done:
                for c, text, before in await job.next(None):
                    if not text and not c.finished and not (want_lp and len(c.token_ids) > before):
                        continue
                    first, c.first = c.first, False
                    choice = schemas.CompletionChoice(index=c.index, text=(echo_text(c) if first else "") + text,
                                                logprobs=logprobs_of(c, before, len(c.token_ids), first),
                                                finish_reason=c.finish_reason)
                    yield _sse(schemas.Completion(id=cid, created=created, model=req.model, choices=[choice]))
            if include_usage:
                yield _sse(schemas.Completion(id=cid, created=created, model=req.model, choices=[],
                                        usage=usage(job, prompts, n)))

        def final_body():
            choices = [schemas.CompletionChoice(index=c.index, text=echo_text(c) + c.text,
                                          logprobs=logprobs_of(c, 0, len(c.token_ids), True),
                                          finish_reason=c.finish_reason) for c in job.choices]
            return schemas.Completion(id=cid, created=created, model=req.model, choices=choices,
                                usage=usage(job, prompts, n))

        return await run(request, job, t0, "completions", stream_body, final_body, bool(req.stream))

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(req: schemas.ChatRequest, request: Request):
        t0 = time.monotonic()
        adapter = check_model(req.model)
        if tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template (no chat_template.jinja or tokenizer_config.json "
                                "chat_template); use /v1/completions or start jaxtx serve with --chat-template FILE",
                           param="messages")
        try:
            messages = [m.for_template() for m in req.messages]
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        extra = req.chat_template_kwargs or {}
        reserved = sorted(set(extra) & {"messages", "tools", "documents", "add_generation_prompt", "special_tokens"})
        if reserved:
            raise APIError(400, f"chat_template_kwargs: {reserved} are set by the server", param="chat_template_kwargs")
        try:
            text = chat_template.render(tokenizer.chat_template, messages,
                                        add_generation_prompt=req.add_generation_prompt,
                                        special_tokens=tokenizer.template_tokens, **extra)
        except chat_template.TemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template wrote the special tokens
        limit = req.output_limit()
        max_new = limit if limit is not None else config.max_model_len - len(ids)
        check_prompt(ids, max(max_new, 1), "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = make_job(req, [ids], engine_kwargs(req, max_new, logprobs=top, prompt_logprobs=False, adapter=adapter))
        cid, created, n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.n or 1

        async def stream_body():
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            extra = dict(usage=None) if include_usage else {}
            for c in job.choices:  # the role comes first, as OpenAI sends it
                c.first = False
                yield _sse(schemas.ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[
                    schemas.ChunkChoice(index=c.index, delta=schemas.Delta(role="assistant", content=""))], **extra))
            while not job.done:
                for c, text, before in await job.next(None):
                    if not text and not c.finished and not (req.logprobs and len(c.token_ids) > before):
                        continue
                    lp = c.chat_logprobs(before, len(c.token_ids)) if req.logprobs else None
                    yield _sse(schemas.ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[
                        schemas.ChunkChoice(index=c.index, delta=schemas.Delta(content=text or None), logprobs=lp,
                                      finish_reason=c.finish_reason)], **extra))
            if include_usage:
                yield _sse(schemas.ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[],
                                                 usage=usage(job, [ids], n)))

        def final_body():
            choices = [schemas.ChatChoice(index=c.index, message=schemas.AssistantMessage(content=c.text),
                                    logprobs=c.chat_logprobs(0, len(c.token_ids)) if req.logprobs else None,
                                    finish_reason=c.finish_reason) for c in job.choices]
            return schemas.ChatCompletion(id=cid, created=created, model=req.model, choices=choices,
                                    usage=usage(job, [ids], n))

        return await run(request, job, t0, "chat", stream_body, final_body, bool(req.stream))

    started = int(time.time())

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        cards = [schemas.ModelCard(id=config.model_name, created=started, max_model_len=config.max_model_len)]
        cards += [schemas.ModelCard(id=name, created=started, root=root, parent=config.model_name,
                                    max_model_len=config.max_model_len) for name, root in config.adapters]
        return Response(schemas.ModelList(data=cards).model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health():
        if not runner.healthy:
            return JSONResponse({"status": "error", "error": runner.error or "engine thread stopped"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route():
        stats = dict(runner.stats)
        stats.setdefault("running", 0)
        return PlainTextResponse(metrics.render(stats), media_type="text/plain; version=0.0.4")

    return app


def _endpoint(request: Request) -> str:
    path = request.url.path
    return "chat" if path.endswith("chat/completions") else "completions" if path.endswith("completions") else path


def _validation_error(e: RequestValidationError) -> APIError:
    """FastAPI's first validation error as a 400 naming the field (OpenAI answers bad values with 400, not 422)."""
    err = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "))
    # pydantic tags union members in the location ("str", "list[int]"...): keep only field names and indices
    param = ".".join(x for x in loc if not any(c in x for c in "[]()") and x not in ("str", "int", "float", "bool")
                     and not x.startswith(("function-", "constrained-")))
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if not param and ": " in msg and msg.split(": ", 1)[0].isidentifier():  # a model-level check names its field
        param, msg = msg.split(": ", 1)
    if err.get("type") == "missing":
        return APIError(400, f"{param}: this field is required", param=param or None)
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) and len(repr(value)) > 80 else f" (got {value!r})"
    return APIError(400, f"{param or 'body'}: {msg}{shown}", param=param or None)
