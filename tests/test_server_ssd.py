"""`saguaro serve --mode ssd` as a real process with its draft worker: exact, survives the worker's
death (degrading to a local draft), and shuts down cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams
from saguaro.ssd.worker import free_port

PROMPT = "def fibonacci(n):"
CHAT = "Name three colors."


def ar_reference(embedded, ids: list[int], max_tokens: int, ignore_eos: bool = True) -> str:
    _, model, tokenizer = embedded
    seq = Sequence(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than two on a busy 2-core machine
    try:
        AREngine(model, tokenizer.stop_token_ids).run([seq])
    finally:
        torch.set_num_threads(threads)
    return tokenizer.decode(seq.output_ids)


class ServerProcess:
    def __init__(self, log_path: Path, *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "saguaro.cli", "serve", "--mode", "ssd", "--k", "3",
                                      "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:
            assert self.proc.poll() is None, f"the server exited: {log_path.read_text()[-3000:]}"
            assert time.time() < deadline, "the server did not start"
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()

    def worker_pid(self) -> int:
        """The draft worker: the server's child running saguaro.ssd.worker."""
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and b"saguaro.ssd.worker" in cmdline:
                return int(d.name)
        raise AssertionError("no draft worker process found")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def stream_events(base: str, body: dict, on_first_text=None) -> list[dict | str]:
    """POST a streaming completion; call on_first_text() once the first text arrives."""
    events = []
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if on_first_text and len(events) == 1:
                on_first_text()
    return events


def text_of(events) -> str:
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))


def test_sigterm_finishes_in_flight_requests_and_stops_the_worker(embedded, tmp_path):
    server = ServerProcess(tmp_path / "server.log")
    try:
        worker = server.worker_pid()
        body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        events = stream_events(server.base, body, on_first_text=lambda: server.proc.send_signal(signal.SIGTERM))
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        ids = embedded[2].encode(PROMPT)
        assert text_of(events) == ar_reference(embedded, ids, 24)
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert not Path(f"/proc/{worker}").exists(), "the draft worker outlived the server"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ssd_server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("ssd-server") / "server.log")
    yield server
    server.stop()


def test_ssd_chat_stream_equals_ar(embedded, ssd_server):
    health = ssd_server.health()
    assert health["status"] == "ok" and health["mode"] == "ssd" and health["degraded"] is None
    client = openai.OpenAI(base_url=ssd_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model=health["model"], stream=True, temperature=0,
                                            max_tokens=16, messages=[{"role": "user", "content": CHAT}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    ids = embedded[2].encode_chat([{"role": "user", "content": CHAT}])
    assert text == ar_reference(embedded, ids, 16, ignore_eos=False)
    metrics = httpx.get(ssd_server.base + "/metrics").json()
    assert 0 <= metrics["acceptance_rate"] <= 1 and 0 <= metrics["cache_hit_rate"] <= 1


def test_ssd_logprobs_penalties_and_n_equal_ar(embedded, ssd_server):
    """Through the SSD server (its verifier counting each round's drafts for the penalties): the same
    tokens as AR, and the target's log-probs to 1e-4 (float32), for each of n=2 greedy choices."""
    _, model, tokenizer = embedded
    client = openai.OpenAI(base_url=ssd_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    settings = dict(presence_penalty=0.5, frequency_penalty=1.0)
    stream = client.chat.completions.create(model=ssd_server.health()["model"], stream=True, temperature=0,
                                            max_tokens=16, n=2, logprobs=True, top_logprobs=2,
                                            messages=[{"role": "user", "content": CHAT}], **settings)
    content: dict[int, list] = {0: [], 1: []}
    for chunk in stream:
        for ch in chunk.choices:
            content[ch.index] += ch.logprobs.content if ch.logprobs else []
    ids = tokenizer.encode_chat([{"role": "user", "content": CHAT}])
    seq = Sequence(ids, SamplingParams(temperature=0, max_tokens=16, logprobs=2, **settings))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        AREngine(model, tokenizer.stop_token_ids).run([seq])
    finally:
        torch.set_num_threads(threads)
    for entries in content.values():
        assert [e.top_logprobs[0].token for e in entries] == [e.token for e in entries]
        assert b"".join(bytes(e.bytes) for e in entries) == b"".join(tokenizer.token_bytes(t) for t in seq.output_ids)
        assert max(abs(e.logprob - t.logprob) for e, t in zip(entries, seq.logprobs)) < 1e-4


def test_worker_killed_while_serving(embedded, ssd_server):
    worker = ssd_server.worker_pid()
    body = {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    killed = threading.Event()

    def kill():
        os.kill(worker, signal.SIGKILL)
        killed.set()

    events = stream_events(ssd_server.base, body, on_first_text=kill)
    assert killed.is_set() and events[-1] == "[DONE]"
    assert text_of(events) == ar_reference(embedded, embedded[2].encode("Once upon a time"), 32)
    health = ssd_server.health()
    assert health["status"] == "degraded" and health["mode"] == "ssd" and health["degraded"]
    again = stream_events(ssd_server.base, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert text_of(again) == ar_reference(embedded, embedded[2].encode(PROMPT), 8)
