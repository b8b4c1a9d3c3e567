"""The FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, plus /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from saguaro.engine.base import ContextLengthError
from saguaro.serve.async_engine import AsyncEngine, Request as EngineRequest, Unavailable
from saguaro.serve.errors import APIError, install_handlers
from saguaro.serve.guard import Guard
from saguaro.serve.protocol import ChatCompletionRequest, CompletionRequest, Shaper, GenerationRequest

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
                "in_flight": engine.in_flight, **engine.stats.snapshot()}

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
            req = engine.submit(ids, params)
        except ContextLengthError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
        except Unavailable as e:
            raise APIError(503, str(e)) from None
        shaper = Shaper(chat, model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(req, shaper, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, req, shaper)

    async def stream(req: EngineRequest, shaper: Shaper, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with [DONE]."""
        try:
            if shaper.chat:
                yield sse(shaper.chunk(None, role=True))
            while True:
                delta = await req.deltas.get()
                if delta.error:
                    yield sse(APIError(503, delta.error).body())
                    break
                if delta.text:
                    yield sse(shaper.chunk(delta.text))
                if delta.finish_reason:
                    yield sse(shaper.chunk(None, delta.finish_reason))
                    if include_usage:
                        yield sse(shaper.usage_chunk(delta.prompt_tokens, delta.completion_tokens))
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task was cancelled) or the stream ended
            engine.abort(req)

    async def collect(request: Request, req: EngineRequest, shaper: Shaper):
        parts = []
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(req.deltas.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    delta = None
                if loop.time() >= next_check:  # nothing is sent before the end, so ask whether anyone waits
                    next_check = loop.time() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; finally frees the row
                if delta is None:
                    continue
                if delta.error:
                    raise APIError(503, delta.error)
                parts.append(delta.text)
                if delta.finish_reason:
                    return shaper.whole("".join(parts), delta.finish_reason, delta.prompt_tokens,
                                        delta.completion_tokens)
        finally:
            engine.abort(req)  # a no-op once the request finished

    def _unknown_model(name: str) -> APIError:
        return APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                        param="model", code="model_not_found")

    return app
