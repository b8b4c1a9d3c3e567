"""Serving: an OpenAI-compatible HTTP server over a continuously batched engine.

`async_engine` (the engine thread) and `detokenizer` need no web framework; `app` and `server`
need fastapi and uvicorn.
"""
