"""`saguaro serve`: the app under uvicorn, shutting down cleanly on SIGINT/SIGTERM.

On a signal the engine stops taking requests (new ones get 503) and uvicorn stops accepting
connections; requests in flight may finish for `grace_s`, then the engine fails the rest (a
stream ends with an error event) and closes, which stops an SSD draft worker.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import uvicorn

from saguaro.serve.app import build_app
from saguaro.serve.async_engine import AsyncEngine

log = logging.getLogger(__name__)

GRACE_S = 30.0


class Server(uvicorn.Server):
    """uvicorn's server that also drains the engine when a signal comes."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace_s: float):
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    def handle_exit(self, sig, frame) -> None:
        log.warning("signal %s: finishing %d requests in flight (at most %.0fs), then exiting",
                    sig, self.engine.in_flight, self.grace_s)
        self.engine.drain(self.grace_s)
        super().handle_exit(sig, frame)


def model_name(path: str | Path) -> str:
    """The id clients pass as `model`: the checkpoint's directory or file name, without extension."""
    p = Path(path)
    return p.stem if p.is_file() else p.name


def make_server(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                max_concurrency: int = 256, grace_s: float = GRACE_S, access_log: bool = False) -> Server:
    engine = AsyncEngine(llm.engine, llm.tokenizer, max_concurrency)
    app = build_app(engine, llm.tokenizer, model_name(llm.target_path), llm.target.config.max_position, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=int(grace_s) + 5)
    return Server(config, engine, grace_s)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 256, access_log: bool = False) -> None:
    if not api_key and not _is_loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", host)
    make_server(llm, host, port, api_key, max_concurrency, access_log=access_log).run()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
