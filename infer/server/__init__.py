"""jaxtx.infer.server: `jaxtx serve`, an OpenAI-compatible HTTP server on the engine (jaxtx.infer.engine).

    app.py            routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
    runner.py         the engine in its own thread; events handed to each request's asyncio queue
    outputs.py        one choice: streaming text, stop strings, logprobs in OpenAI's two layouts
    schemas.py        pydantic request / response models (bad values -> 400 naming the field)
    chat_template.py  chat templates rendered by transformers' rules
    tokenizer.py      tokenizer.json / sentencepiece adapters, incremental detokenization
    structured.py     response_format -> llguidance token bitmasks
    metrics.py        Prometheus text
    cli.py            the `jaxtx serve` command

The HTTP layer uses only the engine's public API (add_request / step / abort / has_work / stats), so the engine stays
usable without a web stack. Importing this package does not import FastAPI; `create_app` does.
"""
