"""Serving parts: incremental detokenization, Engine.abort, the engine thread's failure path, and where
`saguaro serve` runs the engine."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import httpx

from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams
from saguaro.serve.async_engine import AsyncEngine
from saguaro.serve.detokenizer import REPLACEMENT, IncrementalDetokenizer
from saguaro.serve.server import make_server

TEXT = "Café ☕, 世界 and a cactus 🌵🌵 — naïve déjà vu.\n"


def stream(tokenizer, ids: list[int], stop=None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = [detok.update(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1)]
    return [d for d in deltas if d]


def test_multibyte_characters_split_over_tokens_stream_whole(embedded):
    tokenizer = embedded[2]
    ids = tokenizer.encode(TEXT)
    assert any(REPLACEMENT in tokenizer.decode(ids[:n]) for n in range(len(ids)))  # some tokens split a character
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT
    assert not any(REPLACEMENT in d for d in deltas)


def test_stop_strings_are_held_back_then_cut(embedded):
    tokenizer = embedded[2]
    ids = tokenizer.encode(TEXT)
    for stop in (["世界"], ["cactus 🌵", "zzz"], ["vu.\n"], ["nowhere"]):
        expected = TEXT
        for s in stop:
            expected = expected[: expected.find(s)] if s in expected else expected
        deltas = stream(tokenizer, ids, stop)
        assert "".join(deltas) == expected
        assert not any(s in "".join(deltas) for s in stop)


def test_abort_frees_rows_and_leaves_the_others_exact(embedded):
    _, model, tokenizer = embedded
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [tokenizer.encode(p) for p in ("def add(a, b):", "Hello there", "The sky is")]
    alone = Sequence(prompts[0], params)
    AREngine(model, tokenizer.stop_token_ids).run([alone])

    engine = AREngine(model, tokenizer.stop_token_ids, max_batch_size=2)
    seqs = [Sequence(p, params) for p in prompts]
    for s in seqs:
        engine.add(s)
    engine.step()  # two run, the third waits
    engine.abort(seqs[2])
    assert seqs[2].finish_reason == "abort" and not engine.waiting
    engine.abort(seqs[1])
    assert engine.running == [seqs[0]] and engine.cache.batch == 1
    while engine.has_work():
        engine.step()
    assert seqs[0].output_ids == alone.output_ids
    assert len(seqs[1].output_ids) < 10 and seqs[2].output_ids == []


class BrokenEngine:
    mode = "ar"
    lookahead = 1

    def __init__(self):
        self.waiting, self.closed = [], False

    def check(self, seq):
        pass

    def add(self, seq):
        self.waiting.append(seq)

    def has_work(self):
        return bool(self.waiting)

    def step(self):
        raise RuntimeError("boom")

    def abort(self, seq, reason="abort"):
        self.waiting.remove(seq)
        seq.finish_reason = reason

    def close(self):
        self.closed = True


def test_an_engine_failure_fails_requests_and_refuses_new_ones(embedded):
    broken = BrokenEngine()
    engine = AsyncEngine(broken, embedded[2])

    async def go():
        engine.start()
        req = engine.submit([1, 2, 3], SamplingParams(max_tokens=4))
        return await asyncio.wait_for(req.deltas.get(), 30)

    delta = asyncio.run(go())
    assert delta.error and "boom" in delta.error
    engine.close()
    assert broken.closed and engine.failed and not engine.accepting and engine.in_flight == 0


def test_an_engine_run_by_its_owner_closed_before_it_ran_returns_at_once(embedded):
    broken = BrokenEngine()
    engine = AsyncEngine(broken, embedded[2], own_thread=False)
    engine.start()  # a no-op: the owner runs the loop
    engine.close()
    assert broken.closed
    engine.run()  # returns at once, stepping nothing


def test_serve_runs_the_engine_on_the_calling_thread_and_http_beside_it(embedded):
    """`saguaro serve`'s layout: the engine on the thread that loaded the model (here the test's),
    uvicorn on a side thread; a request goes through, and the server returns once told to exit."""
    path, model, tokenizer = embedded
    stepped_on = set()

    class Recording(AREngine):
        def step(self):
            stepped_on.add(threading.get_ident())
            return super().step()

    llm = SimpleNamespace(engine=Recording(model, tokenizer.stop_token_ids), tokenizer=tokenizer, target_path=path,
                          target=model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = make_server(llm, port=port, grace_s=5, engine_thread=False)
    replies = []

    def client():
        deadline = time.time() + 60
        while not srv.started and time.time() < deadline:
            time.sleep(0.05)
        try:
            replies.append(httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                      json={"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}))
        finally:
            srv.should_exit = True

    helper = threading.Thread(target=client)
    helper.start()
    srv.run_beside_engine()
    helper.join()
    assert replies and replies[0].status_code == 200 and replies[0].json()["usage"]["completion_tokens"] == 4
    assert stepped_on == {threading.get_ident()}


def deltas_of(embedded, interval_s: float, stream: bool, max_tokens: int = 12) -> tuple[list, list[int]]:
    """The deltas an AsyncEngine (run by its owner) sends one greedy request, and the tokens generated."""
    _, model, tokenizer = embedded
    engine = AsyncEngine(AREngine(model, tokenizer.stop_token_ids), tokenizer, own_thread=False,
                         stream_interval_s=interval_s)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    got: list = []

    async def client():
        req = engine.submit(tokenizer.encode("The sky is"), params, stream=stream)
        while not got or not got[-1].finish_reason:
            got.append(await req.deltas.get())
        engine.close(timeout=0)
        return req

    box = {}
    side = threading.Thread(target=lambda: box.setdefault("req", asyncio.run(client())))
    side.start()
    engine.run()
    side.join()
    return got, box["req"].seq.output_ids


def test_streamed_text_goes_out_at_most_every_interval_first_text_at_once(embedded):
    tokenizer = embedded[2]
    every_round, ids = deltas_of(embedded, 0.0, stream=True)
    assert len(every_round) >= 6  # one per round whose text is whole (12 tokens)
    coalesced, same_ids = deltas_of(embedded, 3600.0, stream=True)
    assert same_ids == ids
    assert len(coalesced) == 2  # the first text at once, then the rest at the end
    assert coalesced[0].text and coalesced[0].completion_tokens <= 2 and coalesced[1].finish_reason == "length"
    for got in (every_round, coalesced):
        assert "".join(d.text for d in got) == tokenizer.decode(ids)
        assert got[-1].completion_tokens == 12


def test_a_request_not_streamed_hears_only_its_end(embedded):
    tokenizer = embedded[2]
    got, ids = deltas_of(embedded, 0.0, stream=False)
    assert len(got) == 1 and got[0].finish_reason == "length"
    assert got[0].text == tokenizer.decode(ids) and got[0].completion_tokens == 12
