"""The engine behind the server: one thread owns it and runs step() in a loop.

That thread is its own (`start`) or the caller's (`run`). `saguaro serve` runs it on the main thread,
the one that loaded the model, and HTTP on a side thread (server.py): torch's OpenMP workers then
spin between kernels as they do under `LLM.generate`, where a second thread running kernels made
libgomp stop spinning (it counted more threads than cores) and every kernel wait for its workers to
wake, which cost a single client ~half of its tokens/s on 2 cores (docs/serving.md).

Request handlers (on the asyncio loop) submit and abort through a thread-safe inbox; the engine
thread takes them in between rounds, so requests join and leave a running batch (continuous
batching). After each round every changed request gets its new text as a `Delta` on its own
asyncio queue. A request with n > 1 runs n sequences (its choices) side by side in the batch; their
deltas share the request's queue, each saying which choice it belongs to.

A streamed choice's text goes out at most every `stream_interval_s` (its first text at once); a
request that is not streamed hears only its end. Each delta wakes the event loop's thread, and on a
CPU whose every core runs the forward that wake-up takes a core from it for a moment: the whole step
waits at OpenMP's barrier. One delta per round cost a streamed single client 16% of `LLM()`'s
tokens/s on 2 cores, and one that was not streamed 9% (docs/serving.md).
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
from saguaro.sampling import SamplingParams, TokenLogprob, choices
from saguaro.serve.detokenizer import IncrementalDetokenizer
from saguaro.serve.stats import ServerStats

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
    """The server is shutting down, or has more requests in flight than it takes."""


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None  # set on the last delta of a choice
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the request failed; no more deltas come
    index: int = 0  # the choice
    logprobs: list[TokenLogprob] | None = None  # of the tokens whose text has now been sent in full


@dataclass(eq=False)
class Choice:
    seq: Sequence
    detok: IncrementalDetokenizer
    index: int
    tokens_seen: int = 0
    logprobs_sent: int = 0
    done: bool = False
    sent_at: float | None = None  # when its last delta went out (time.monotonic)


@dataclass(eq=False)
class Request:
    choices: list[Choice]
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # deltas as the text grows; False: one at the end
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def done(self) -> bool:
        return all(c.done for c in self.choices)

    @property
    def seq(self) -> Sequence:
        return self.choices[0].seq


STREAM_INTERVAL_S = 0.05  # at most 20 deltas a second per streamed choice: still a smooth stream to read


class AsyncEngine:
    def __init__(self, engine: Engine, tokenizer, max_concurrency: int = 256, own_thread: bool = True,
                 stream_interval_s: float = STREAM_INTERVAL_S):
        """own_thread: `start` runs the engine on a thread of its own; else the owner calls `run`.
        stream_interval_s: the least time between two deltas of a streamed choice (0: every round)."""
        if stream_interval_s < 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {stream_interval_s}")
        self.engine, self.tokenizer = engine, tokenizer
        self.max_concurrency = max_concurrency
        self.stream_interval_s = stream_interval_s
        self.stats = ServerStats()
        self.accepting = True
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._live: dict[int, tuple[Request, Choice]] = {}  # by sequence id; engine thread only
        self._in_flight = 0
        self._lock = threading.Lock()
        self._deadline: float | None = None  # after it, requests still in flight are failed
        self._closing = False
        self._started = False  # the loop ran (or runs): it closes the engine when it ends
        self._stopped = threading.Event()
        self.failed: str | None = None  # why the engine loop stopped, if an engine step raised
        self._thread = threading.Thread(target=self.run, name="saguaro-engine", daemon=True) if own_thread else None

    @property
    def mode(self) -> str:
        return self.engine.mode

    @property
    def degraded(self) -> str | None:
        return getattr(self.engine, "degraded", None)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def forward_info(self) -> dict:
        """The target's dtype, whether its compiled step is attached, and how many forwards it ran."""
        target = self.engine.target
        compiled = getattr(target, "compiled", None)
        return {"dtype": str(target.dtype).removeprefix("torch."), "compiled": compiled is not None,
                "compiled_calls": compiled.stats.compiled_calls if compiled is not None else 0}

    # ------------------------------------------------------------------ request side (event loop)
    def start(self) -> None:
        """Start the engine thread; a no-op where the owner runs the engine (`run`)."""
        if self._thread is not None:
            self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True) -> Request:
        """Queue a request (params.n sequences); raises ValueError (bad prompt or settings, over the
        context) or Unavailable. stream=False: its deltas come only as each choice ends."""
        picks = []
        for i, p in enumerate(choices(params)):
            detok = IncrementalDetokenizer(self.tokenizer, p.stop)
            picks.append(Choice(Sequence(prompt_ids, p, stop_check=detok.stops), detok, i))  # the engine stops it
        self.engine.check(picks[0].seq)  # reads only the model config: safe from this thread
        with self._lock:
            if not self.accepting:
                raise Unavailable(self.failed or "the server is shutting down")
            if self._in_flight + len(picks) > self.max_concurrency:
                raise Unavailable(f"the server is at its limit of {self.max_concurrency} sequences in flight; "
                                  "retry later")
            self._in_flight += len(picks)
        req = Request(picks, asyncio.get_running_loop(), stream)
        self._post("add", req)
        return req

    def abort(self, req: Request) -> None:
        """The client is gone: drop the request between rounds, freeing its batch rows."""
        if not req.done:
            self._post("abort", req)

    def drain(self, grace_s: float) -> None:
        """Stop taking requests; those in flight may finish within grace_s, then they are failed."""
        with self._lock:
            self.accepting = False
            self._deadline = time.monotonic() + grace_s
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Fail what is left, stop the loop and close the engine (stopping an SSD draft worker); from any
        thread but the loop's."""
        with self._lock:
            self.accepting = False
            self._closing = True
            started = self._started
        self._wake.set()
        if started:  # the loop closes the engine as it ends
            self._stopped.wait(timeout)
        else:
            self.engine.close()

    def _post(self, kind: str, req: Request) -> None:
        self._inbox.put((kind, req))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def run(self) -> None:
        """The engine loop, on the calling thread, until `close` (or an engine failure); then the
        engine is closed. Returns at once if `close` came first."""
        with self._lock:
            if self._closing:
                return
            self._started = True
        try:
            self._loop()
        finally:
            self._stopped.set()

    def _loop(self) -> None:
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
            for choice in req.choices:
                if kind == "add":
                    self._live[choice.seq.id] = (req, choice)
                    self.engine.add(choice.seq)
                elif not choice.done:  # abort
                    self.engine.abort(choice.seq)
                    self._finish(choice, "aborted")

    def _step(self) -> None:
        t0 = time.perf_counter()
        changed = self.engine.step()
        now = time.monotonic()
        new_tokens = 0
        for seq in changed:
            live = self._live.get(seq.id)
            if live is None:
                continue
            req, choice = live
            new_tokens += max(0, len(seq.output_ids) - choice.tokens_seen)  # a stop string may cut tokens
            choice.tokens_seen = len(seq.output_ids)
            if seq.finished or self._due(req, choice, now):
                self._emit(req, choice, now)
        self.stats.round(len(changed), new_tokens, time.perf_counter() - t0)

    def _due(self, req: Request, choice: Choice, now: float) -> bool:
        """Whether a running choice's new text goes out now (its first text always does: time to first token)."""
        return req.stream and (choice.sent_at is None or now - choice.sent_at >= self.stream_interval_s)

    def _emit(self, req: Request, choice: Choice, now: float) -> None:
        seq = choice.seq
        text = choice.detok.update(seq.output_ids, final=seq.finished)
        if not text and not seq.finished:
            return
        logprobs = None
        if seq.logprobs is not None:  # those of the tokens whose text went out (all of them at the end)
            upto = len(seq.logprobs) if seq.finished else choice.detok.covered(seq.output_ids, choice.logprobs_sent)
            logprobs, choice.logprobs_sent = seq.logprobs[choice.logprobs_sent:upto], upto
        self._send(req, Delta(text, seq.finish_reason, len(seq.prompt_ids), len(seq.output_ids), index=choice.index,
                              logprobs=logprobs))
        choice.sent_at = now
        if seq.finished:
            self._finish(choice, "served")

    def _fail_all(self, message: str) -> None:
        for req, choice in list(self._live.values()):
            try:
                self.engine.abort(choice.seq)
            except Exception:  # the engine may be in no state to retire rows; the request fails anyway
                log.exception("could not abort sequence %d", choice.seq.id)
            self._send(req, Delta("", "error", len(choice.seq.prompt_ids), len(choice.seq.output_ids), error=message,
                                  index=choice.index))
            self._finish(choice, "failed")

    def _finish(self, choice: Choice, outcome: str) -> None:
        choice.done = True
        self._live.pop(choice.seq.id, None)
        self.stats.finished(choice.seq, outcome)
        with self._lock:
            self._in_flight -= 1

    @staticmethod
    def _send(req: Request, delta: Delta) -> None:
        try:
            req.loop.call_soon_threadsafe(req.deltas.put_nowait, delta)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
