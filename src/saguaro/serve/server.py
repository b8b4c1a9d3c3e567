"""`saguaro serve`: the app under uvicorn, shutting down cleanly on SIGINT/SIGTERM.

The engine runs on the main thread, the one that loaded the model, and uvicorn's event loop on a
side thread (`Server.run_beside_engine`); see async_engine.py for why.

On a signal the engine stops taking requests (new ones get 503) and uvicorn stops accepting
connections; requests in flight may finish for `grace_s`, then the engine fails the rest (a
stream ends with an error event) and closes, which stops an SSD draft worker.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
import threading
from pathlib import Path

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from saguaro.serve.app import build_app
from saguaro.serve.async_engine import STREAM_INTERVAL_S, AsyncEngine

log = logging.getLogger(__name__)

GRACE_S = 30.0


class Server(uvicorn.Server):
    """uvicorn's server that also drains the engine when a signal comes."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace_s: float):
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0  # uvicorn's, where it stopped by itself (it could not start)

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        log.warning("signal %s: finishing %d requests in flight (at most %.0fs), then exiting",
                    sig, self.engine.in_flight, self.grace_s)
        self.engine.drain(self.grace_s)
        super().handle_exit(sig, frame)

    def run_beside_engine(self) -> None:
        """Serve HTTP from a side thread while the engine runs on this one (the main thread), until
        the server shuts down; then exit as uvicorn does: with its status, or by the signal it got."""
        web = threading.Thread(target=self._serve_http, name="saguaro-http")
        saved = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        try:
            web.start()
            self.engine.run()
            web.join()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        if self.exit_code:
            sys.exit(self.exit_code)
        for sig in reversed(self._captured_signals):
            signal.raise_signal(sig)

    def _serve_http(self) -> None:
        try:
            self.run()
        except SystemExit as e:  # uvicorn could not start (say, the port is taken)
            self.exit_code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("the HTTP server failed")
            self.exit_code = 1
        finally:
            self.engine.close()  # ends the engine loop (uvicorn's shutdown has closed it already)

    def _on_signal(self, sig, frame) -> None:
        """Signal handler (main thread, between any two bytecodes of the engine loop): hand the signal
        to the event loop, taking no lock here."""
        loop = self.loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self.handle_exit, sig, None)
                return
        except RuntimeError:  # the loop has closed
            pass
        self._captured_signals.append(sig)
        self.should_exit = True


def model_name(path: str | Path) -> str:
    """The id clients pass as `model`: the checkpoint's directory or file name, without extension."""
    p = Path(path)
    return p.stem if p.is_file() else p.name


def make_server(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                max_concurrency: int = 256, grace_s: float = GRACE_S, access_log: bool = False,
                engine_thread: bool = True, stream_interval_s: float = STREAM_INTERVAL_S) -> Server:
    """engine_thread: the engine runs on a thread of its own (started with the app), for `Server.run`;
    False for `Server.run_beside_engine`. stream_interval_s: see AsyncEngine."""
    engine = AsyncEngine(llm.engine, llm.tokenizer, max_concurrency, own_thread=engine_thread,
                         stream_interval_s=stream_interval_s)
    app = build_app(engine, llm.tokenizer, model_name(llm.target_path), llm.target.config.max_position, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=int(grace_s) + 5)
    return Server(config, engine, grace_s)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 256, access_log: bool = False, stream_interval_s: float = STREAM_INTERVAL_S) -> None:
    if not api_key and not _is_loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", host)
    make_server(llm, host, port, api_key, max_concurrency, access_log=access_log,
                engine_thread=False, stream_interval_s=stream_interval_s).run_beside_engine()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
