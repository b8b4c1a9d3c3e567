"""The FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, plus /health and /metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from saguaro import __version__
from saguaro.engine.base import ContextLengthError
from saguaro.sampling import ParamError
from saguaro.serve.async_engine import AsyncEngine, Delta, Request as EngineRequest, Unavailable
from saguaro.serve.errors import APIError, install_handlers
from saguaro.serve.guard import Guard
from saguaro.serve.logprobs import LogprobFormatter
from saguaro.serve.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest, Shaper

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512  # chat has no default in OpenAI's API (up to the context); we cap it
DISCONNECT_POLL_S = 1.0


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(engine: AsyncEngine, tokenizer, model_name: str, context: int, api_key: str | None = None,
              max_body_bytes: int = 4 << 20) -> FastAPI:
    """An app serving `engine`; its lifespan starts the engine thread and closes the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s in %s mode", model_name, engine.mode)
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="saguaro", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    created = int(time.time())
    # the backend configuration, as OpenAI's system_fingerprint: the same for the same code, model and mode
    fingerprint = "fp_" + hashlib.sha256(f"saguaro {__version__}|{model_name}|{engine.mode}".encode()).hexdigest()[:12]
    formatter = LogprobFormatter(tokenizer)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "saguaro"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise _unknown_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        degraded = engine.degraded
        if engine.failed:
            status = "failed"
        elif not engine.accepting:
            status = "shutting_down"
        else:
            status = "degraded" if degraded else "ok"
        body = {"status": status, "mode": engine.mode, "model": model_name, "degraded": degraded,
                "error": engine.failed, "in_flight": engine.in_flight}
        return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503)

    @app.get("/metrics")
    async def metrics():
        return {"mode": engine.mode, "model": model_name, "degraded": engine.degraded,
                "in_flight": engine.in_flight, **engine.forward_info(), **engine.stats.snapshot()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        return await generate(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if not body.messages:
            raise APIError(400, "messages is empty", param="messages")
        messages = [m.as_template_input() for m in body.messages]
        try:
            ids = tokenizer.encode_chat(messages)
        except Exception as e:  # no template, or the template refuses these messages
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        return await generate(request, body, ids, chat=True)

    async def generate(request: Request, body: GenerationRequest, ids: list[int], chat: bool):
        if body.model is not None and body.model != model_name:
            raise _unknown_model(body.model)
        param = "messages" if chat else "prompt"
        room = context - len(ids) - engine.engine.lookahead
        default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, room)) if chat else DEFAULT_MAX_TOKENS
        params = body.sampling_params(default)
        try:
            req = engine.submit(ids, params, stream=bool(body.stream))
        except ParamError as e:  # a logit_bias token outside the vocabulary
            raise APIError(400, str(e), param=body.field_name(e.param)) from None
        except ContextLengthError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
        except Unavailable as e:
            raise APIError(503, str(e)) from None
        shaper = Shaper(chat, model_name, fingerprint)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(req, shaper, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, req, shaper)

    def logprobs(chat: bool, delta: Delta, offsets: list[int]) -> dict | None:
        """The delta's log-probs in the route's shape (completions carry each choice's text offset on)."""
        if delta.logprobs is None:
            return None
        if chat:
            return formatter.chat(delta.logprobs)
        out, offsets[delta.index] = formatter.completion(delta.logprobs, offsets[delta.index])
        return out

    async def stream(req: EngineRequest, shaper: Shaper, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with [DONE]."""
        n = len(req.choices)
        offsets, completion_tokens, finished = [0] * n, [0] * n, 0
        try:
            if shaper.chat:
                for i in range(n):
                    yield sse(shaper.chunk(i, None, role=True))
            while finished < n:
                delta = await req.deltas.get()
                if delta.error:
                    yield sse(APIError(503, delta.error).body())
                    break
                lps = logprobs(shaper.chat, delta, offsets)
                if delta.text or (lps and (lps.get("content") or lps.get("tokens"))):
                    yield sse(shaper.chunk(delta.index, delta.text or None, logprobs=lps))
                if delta.finish_reason:
                    yield sse(shaper.chunk(delta.index, None, delta.finish_reason))
                    completion_tokens[delta.index] = delta.completion_tokens
                    finished += 1
            if finished == n and include_usage:
                yield sse(shaper.usage_chunk(len(req.seq.prompt_ids), sum(completion_tokens)))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task was cancelled) or the stream ended
            engine.abort(req)

    async def collect(request: Request, req: EngineRequest, shaper: Shaper):
        n = len(req.choices)
        parts: list[list[str]] = [[] for _ in range(n)]
        items: list[list | None] = [None] * n
        finish: list[str | None] = [None] * n
        completion_tokens = [0] * n
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while any(f is None for f in finish):
                try:
                    delta = await asyncio.wait_for(req.deltas.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    delta = None
                if loop.time() >= next_check:  # nothing is sent before the end, so ask whether anyone waits
                    next_check = loop.time() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; finally frees the rows
                if delta is None:
                    continue
                if delta.error:
                    raise APIError(503, delta.error)
                i = delta.index
                parts[i].append(delta.text)
                if delta.logprobs is not None:
                    items[i] = (items[i] or []) + delta.logprobs
                if delta.finish_reason:
                    finish[i], completion_tokens[i] = delta.finish_reason, delta.completion_tokens
            wanted = req.seq.params.logprobs is not None
            choices = [("".join(parts[i]), finish[i], None if not wanted else
                        formatter.chat(items[i] or []) if shaper.chat else formatter.completion(items[i] or [], 0)[0])
                       for i in range(n)]
            return shaper.whole(choices, len(req.seq.prompt_ids), sum(completion_tokens))
        finally:
            engine.abort(req)  # a no-op once the request finished

    def _unknown_model(name: str) -> APIError:
        return APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                        param="model", code="model_not_found")

    return app
