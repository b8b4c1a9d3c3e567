"""The engine behind the server: one thread owns it and runs step() in a loop.

Request handlers (on the asyncio loop) submit and abort through a thread-safe inbox; the engine
thread takes them in between rounds, so requests join and leave a running batch (continuous
batching). After each round every changed request gets its new text as a `Delta` on its own
asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from saguaro.engine.base import Engine
from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams
from saguaro.serve.detokenizer import IncrementalDetokenizer
from saguaro.serve.stats import ServerStats

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
    """The server is shutting down, or has more requests in flight than it takes."""


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None  # set on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the request failed; no more deltas come


@dataclass(eq=False)
class Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens_seen: int = 0
    done: bool = False

    @property
    def id(self) -> int:
        return self.seq.id


class AsyncEngine:
    def __init__(self, engine: Engine, tokenizer, max_concurrency: int = 256):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_concurrency = max_concurrency
        self.stats = ServerStats()
        self.accepting = True
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._live: dict[int, Request] = {}  # engine thread only
        self._in_flight = 0
        self._lock = threading.Lock()
        self._deadline: float | None = None  # after it, requests still in flight are failed
        self._closing = False
        self.failed: str | None = None  # why the engine loop stopped, if an engine step raised
        self._thread = threading.Thread(target=self._run, name="saguaro-engine", daemon=True)

    @property
    def mode(self) -> str:
        return self.engine.mode

    @property
    def degraded(self) -> str | None:
        return getattr(self.engine, "degraded", None)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ------------------------------------------------------------------ request side (event loop)
    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; raises ValueError (bad prompt, over the context) or Unavailable."""
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        seq = Sequence(prompt_ids, params, stop_check=detok.stops)  # the engine ends it at a stop string
        self.engine.check(seq)  # reads only the model config: safe from this thread
        with self._lock:
            if not self.accepting:
                raise Unavailable(self.failed or "the server is shutting down")
            if self._in_flight >= self.max_concurrency:
                raise Unavailable(f"the server is at its limit of {self.max_concurrency} requests in flight; "
                                  "retry later")
            self._in_flight += 1
        req = Request(seq, detok, asyncio.get_running_loop())
        self._post("add", req)
        return req

    def abort(self, req: Request) -> None:
        """The client is gone: drop the request between rounds, freeing its batch row."""
        if not req.done:
            self._post("abort", req)

    def drain(self, grace_s: float) -> None:
        """Stop taking requests; those in flight may finish within grace_s, then they are failed."""
        with self._lock:
            self.accepting = False
            self._deadline = time.monotonic() + grace_s
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Fail what is left, stop the thread and close the engine (stopping an SSD draft worker)."""
        with self._lock:
            self.accepting = False
        self._closing = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:
            self.engine.close()

    def _post(self, kind: str, req: Request) -> None:
        self._inbox.put((kind, req))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._closing:
                self._wake.clear()
                try:
                    self._take_inbox()
                    if self._deadline is not None and time.monotonic() > self._deadline:
                        self._fail_all("the server shut down before this request finished")
                    if not self.engine.has_work():
                        self._wake.wait(0.5)
                        continue
                    self._step()
                except Exception as e:  # the engine's state is unknown now: fail everything, take nothing new
                    log.exception("the engine failed")
                    with self._lock:
                        self.accepting = False
                    self.failed = f"the engine failed: {type(e).__name__}: {e}"
                    break
            self._take_inbox()
            self._fail_all(self.failed or "the server shut down before this request finished")
        finally:
            try:
                self.engine.close()
            except Exception:
                log.exception("closing the engine failed")

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._live[req.id] = req
                self.engine.add(req.seq)
            elif not req.done:  # abort
                self.engine.abort(req.seq)
                self._finish(req, "aborted")

    def _step(self) -> None:
        t0 = time.perf_counter()
        changed = self.engine.step()
        new_tokens = 0
        for seq in changed:
            req = self._live.get(seq.id)
            if req is None:
                continue
            new_tokens += max(0, len(seq.output_ids) - req.tokens_seen)  # a stop string may cut tokens
            req.tokens_seen = len(seq.output_ids)
            self._emit(req)
        self.stats.round(len(changed), new_tokens, time.perf_counter() - t0)

    def _emit(self, req: Request) -> None:
        seq = req.seq
        text = req.detok.update(seq.output_ids, final=seq.finished)
        if not text and not seq.finished:
            return
        self._send(req, Delta(text, seq.finish_reason, len(seq.prompt_ids), len(seq.output_ids)))
        if seq.finished:
            self._finish(req, "served")

    def _fail_all(self, message: str) -> None:
        for req in list(self._live.values()):
            try:
                self.engine.abort(req.seq)
            except Exception:  # the engine may be in no state to retire rows; the request fails anyway
                log.exception("could not abort request %d", req.id)
            self._send(req, Delta("", "error", len(req.seq.prompt_ids), len(req.seq.output_ids), error=message))
            self._finish(req, "failed")

    def _finish(self, req: Request, outcome: str) -> None:
        req.done = True
        self._live.pop(req.id, None)
        self.stats.finished(req.seq, outcome)
        with self._lock:
            self._in_flight -= 1

    @staticmethod
    def _send(req: Request, delta: Delta) -> None:
        try:
            req.loop.call_soon_threadsafe(req.deltas.put_nowait, delta)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
