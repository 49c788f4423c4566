"""`cupaged serve`: an OpenAI-compatible HTTP server (aiohttp, the `serve` extra) on an AsyncLLM.

    cupaged serve --model /tmp/qwen3-tiny --device cpu --port 8000 [--api-key KEY]

Routes: POST /v1/completions, POST /v1/chat/completions (OpenAI's request and response shapes; `stream: true`
sends server-sent events ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus).

- protocol.py: request bodies -> prompts, messages and SamplingParams, with OpenAI's errors;
- metrics.py: the Prometheus counters and histograms;
- app.py: the routes, streaming, shutdown, and the `serve` command.
The engine core runs in a process of its own (engine/core_client.py); the server speaks to it through
engine/async_llm.py only.
"""
