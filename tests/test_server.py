"""The OpenAI-compatible server on the embedded target (ar mode), through the official openai client.

One server (with an API key) serves the whole module from a thread; the greedy references come from
`LLM.generate` on the same LLM before the server takes its engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from saguaro import LLM, SamplingParams

KEY = "test-key"
PROMPT = "def fibonacci(n):"
CHAT = "Name three colors."
CHATS = ["Name three colors.", "What is 2+2?", "Say hello in French.", "Write a haiku about cacti.",
         "What is the capital of Italy?", "Give me a word that rhymes with cat.", "Count to five.",
         "What is Python?"]
MAX_TOKENS = 12
BURST_TOKENS = 8


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    llm = LLM(mode="ar", threads=1)  # one thread: far faster than two on a busy 2-core machine
    refs = {
        "completion": llm.generate(PROMPT, greedy(MAX_TOKENS))[0],
        "chat": llm.generate(CHAT, greedy(MAX_TOKENS), chat=True)[0],
        "long": llm.generate("Once upon a time", greedy(16, ignore_eos=True))[0],
        "seeded": llm.generate(PROMPT, SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8))[0],
        "burst": {c: llm.generate(c, greedy(BURST_TOKENS), chat=True)[0].text for c in CHATS},
    }
    with running_server(llm) as (base, srv):
        model = httpx.get(f"{base}/v1/models", headers=auth()).json()["data"][0]["id"]
        yield {"base": base, "model": model, "refs": refs, "tokenizer": llm.tokenizer, "engine": srv.engine}
    llm.close()
    torch.set_num_threads(threads)


@contextlib.contextmanager
def running_server(llm):
    """(base URL, server) of `llm` served from a thread, with the API key KEY."""
    from saguaro.serve.server import make_server

    srv = make_server(llm, api_key=KEY, grace_s=5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", srv
    finally:
        srv.should_exit = True
        thread.join(60)


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=key, max_retries=0, timeout=120)


def metrics(server) -> dict:
    return httpx.get(server["base"] + "/metrics", headers=auth()).json()


def test_models_and_health(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == [server["model"]]
    health = httpx.get(server["base"] + "/health").json()  # open without a key
    assert health["status"] == "ok" and health["mode"] == "ar" and health["degraded"] is None


@pytest.mark.parametrize("stream", [False, True])
def test_completion_greedy_equals_generate(server, stream):
    ref = server["refs"]["completion"]
    kw = dict(model=server["model"], prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    if stream:
        chunks = list(client(server).completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [ref.outputs[0].finish_reason]
    else:
        out = client(server).completions.create(**kw)
        text = out.choices[0].text
        assert out.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert out.usage.completion_tokens == len(ref.token_ids)
    assert text == ref.text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_generate(server, stream):
    ref = server["refs"]["chat"]
    kw = dict(model=server["model"], messages=[{"role": "user", "content": CHAT}], max_tokens=MAX_TOKENS,
              temperature=0)
    if stream:
        chunks = list(client(server).chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                             **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    else:
        out = client(server).chat.completions.create(**kw)
        text = out.choices[0].message.content
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert text == ref.text


def test_seeded_sampling_equals_generate(server):
    kw = dict(model=server["model"], prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    texts = [client(server).completions.create(**kw).choices[0].text for _ in range(2)]
    assert texts == [server["refs"]["seeded"].text] * 2


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text(server, stream):
    ref = server["refs"]["long"].text
    stop = ref[len(ref) // 2: len(ref) // 2 + 2]
    expected = ref[: ref.find(stop)]
    kw = dict(model=server["model"], prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client(server).completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        out = client(server).completions.create(**kw)
        text = out.choices[0].text
        assert out.choices[0].finish_reason == "stop"
    assert text == expected


def test_concurrent_streams_are_batched_and_correct(server):
    before = metrics(server)
    aclient = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
    asks = [CHATS[i % len(CHATS)] for i in range(32)]

    async def one(content: str) -> str:
        stream = await aclient.chat.completions.create(
            model=server["model"], messages=[{"role": "user", "content": content}], max_tokens=BURST_TOKENS,
            temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(a) for a in asks))
        finally:
            await aclient.close()

    texts = asyncio.run(all_of_them())
    assert texts == [server["refs"]["burst"][a] for a in asks]
    after = metrics(server)
    assert after["requests_served"] - before["requests_served"] == 32
    assert after["max_seqs_per_round"] > 1 and after["mean_seqs_per_round"] >= 1
    assert after["tokens_generated"] > before["tokens_generated"] and after["tokens_per_s"] > 0


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(auth(key) if key else {})}
    return httpx.post(server["base"] + path, content=content, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 4', 422, None),  # malformed JSON
    ("/v1/completions", {"prompt": "x", "max_tokens": "lots"}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": "hello"}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages.0.role"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": [1] * 9000}, 400, "prompt"),  # over the context
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/nowhere", {"prompt": "x"}, 404, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    ok = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_errors_through_the_openai_client(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model=server["model"], prompt="x", max_tokens=2)
    assert post(server, "/v1/completions", {"prompt": "x"}, key=None).status_code == 401
    assert httpx.get(server["base"] + "/metrics").status_code == 401
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).completions.create(model=server["model"], prompt="x", max_tokens=-1)
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    assert post(server, "/v1/completions", big).status_code == 413
    out = client(server).completions.create(model=server["model"], prompt=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0)
    assert out.choices[0].text == server["refs"]["completion"].text


def test_client_disconnect_frees_its_slot_and_other_streams_go_on(server):
    before = metrics(server)
    body = {"model": server["model"], "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    result = {}

    def other_stream():
        result["text"] = client(server).completions.create(
            model=server["model"], prompt="Once upon a time", max_tokens=16, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        result["text"] = "".join(c.choices[0].text for c in result["text"] if c.choices)

    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server["base"] + "/v1/completions", json=body, headers=auth()) as r:
            events = (line for line in r.iter_lines() if line.startswith("data:"))
            next(events)
            t = threading.Thread(target=other_stream)
            t.start()
            next(events)  # one more event, then hang up mid-stream
    t.join(120)
    assert result["text"] == server["refs"]["long"].text
    deadline = time.time() + 30
    while metrics(server)["in_flight"] and time.time() < deadline:
        time.sleep(0.1)
    after = metrics(server)
    assert after["in_flight"] == 0
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 400  # it stopped well before 400


def test_over_the_concurrency_limit_is_503(server, monkeypatch):
    monkeypatch.setattr(server["engine"], "max_concurrency", 0)
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    monkeypatch.undo()
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_client_that_gives_up_on_a_whole_response_frees_its_slot(server):
    before = metrics(server)
    body = {"model": server["model"], "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["base"] + "/v1/completions", json=body, headers=auth(), timeout=1.0)
    deadline = time.time() + 30
    while metrics(server)["in_flight"] and time.time() < deadline:
        time.sleep(0.1)
    after = metrics(server)
    assert after["in_flight"] == 0 and after["requests_aborted"] == before["requests_aborted"] + 1
