"""The OpenAI fields beyond the basics, through the official openai client, streamed and not: logprobs,
n with seeds, best_of refused, penalties, min_p, logit_bias, usage, max_completion_tokens,
system_fingerprint, and a 400 naming the field for every value out of range.

The references come from `LLM.generate` with the same settings, on the LLM the server then serves (AR).
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from saguaro import LLM, SamplingParams
from saguaro.sampling import choice_seed
from tests.test_server import KEY, auth, post, running_server

PROMPT = "def fibonacci(n):"
STORY = "Once upon a time"
CHAT = "Name three colors."
N_SEED = 11


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


PENALTIES = dict(presence_penalty=1.0, frequency_penalty=1.5)


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    llm = LLM(mode="ar", threads=1)  # one thread: far faster than two on a busy 2-core machine
    plain = llm.generate(STORY, greedy(16, ignore_eos=True))[0]
    first = plain.token_ids[0]
    refs = {
        "plain": plain,
        "completion_lp": llm.generate(PROMPT, greedy(8, logprobs=2))[0],
        "chat_lp": llm.generate(CHAT, greedy(8, logprobs=3), chat=True)[0],
        "n": llm.generate(PROMPT, SamplingParams(temperature=0.9, n=3, seed=N_SEED, max_tokens=6))[0],
        "chat_n": llm.generate(CHAT, SamplingParams(temperature=0.9, n=2, seed=N_SEED, max_tokens=6), chat=True)[0],
        "penalties": llm.generate(STORY, greedy(16, ignore_eos=True, **PENALTIES))[0],
        "repetition": llm.generate(STORY, greedy(16, ignore_eos=True, repetition_penalty=1.5))[0],
        "min_p": llm.generate(STORY, SamplingParams(temperature=1.2, min_p=0.2, seed=3, max_tokens=12))[0],
        "bias": llm.generate(STORY, greedy(16, ignore_eos=True, logit_bias={first: -100}))[0],
        "first": first,
    }
    with running_server(llm) as (base, srv):
        model = httpx.get(f"{base}/v1/models", headers=auth()).json()["data"][0]["id"]
        yield {"base": base, "model": model, "refs": refs, "tokenizer": llm.tokenizer}
    llm.close()
    torch.set_num_threads(threads)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(server, chat: bool, stream: bool, **kw) -> dict:
    """A request through the openai client, streamed chunks merged: {"choices": {index: {text, finish,
    logprobs}}, "usage", "fingerprints"}."""
    c = client(server)
    if chat:
        kw.setdefault("messages", [{"role": "user", "content": CHAT}])
        create = c.chat.completions.create
    else:
        kw.setdefault("prompt", PROMPT)
        create = c.completions.create
    if not stream:
        out = create(model=server["model"], **kw).model_dump()
        return {"choices": {ch["index"]: {"text": ch["message"]["content"] if chat else ch["text"],
                                          "finish": ch["finish_reason"], "logprobs": ch["logprobs"]}
                            for ch in out["choices"]},
                "usage": out["usage"], "fingerprints": {out["system_fingerprint"]}}
    chunks = [ch.model_dump() for ch in create(model=server["model"], stream=True,
                                               stream_options={"include_usage": True}, **kw)]
    merged: dict[int, dict] = {}
    for chunk in chunks:
        for ch in chunk["choices"]:
            m = merged.setdefault(ch["index"], {"text": "", "finish": None, "logprobs": None})
            m["text"] += (ch["delta"]["content"] or "") if chat else ch["text"]
            m["finish"] = ch["finish_reason"] or m["finish"]
            if ch["logprobs"] is not None:
                lp = ch["logprobs"]
                if m["logprobs"] is None:
                    m["logprobs"] = {k: [] for k in (["content"] if chat else lp)}
                for k in m["logprobs"]:
                    m["logprobs"][k] += lp[k]
    return {"choices": merged, "usage": chunks[-1]["usage"], "fingerprints": {c["system_fingerprint"] for c in chunks}}


STREAM = pytest.mark.parametrize("stream", [False, True])


@STREAM
def test_completion_logprobs(server, stream):
    ref = server["refs"]["completion_lp"]
    out = ask(server, False, stream, max_tokens=8, temperature=0, logprobs=2)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == ref.text == "".join(lp["tokens"])
    assert lp["token_logprobs"] == [t.logprob for t in ref.outputs[0].logprobs]
    for logprob, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and logprob == max(top.values())  # greedy: the chosen token is the top one
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert out["usage"]["completion_tokens"] == len(lp["tokens"]) == len(ref.token_ids)


@STREAM
def test_chat_logprobs(server, stream):
    ref = server["refs"]["chat_lp"]
    out = ask(server, True, stream, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = out["choices"][0]["logprobs"]["content"]
    assert out["choices"][0]["text"] == ref.text
    assert [e["logprob"] for e in content] == [t.logprob for t in ref.outputs[0].logprobs]
    assert [e["top_logprobs"][i]["logprob"] for e in content for i in range(3)] == \
        [v for t in ref.outputs[0].logprobs for _, v in t.top]
    for e in content:
        assert len(e["top_logprobs"]) == 3 and e["token"] == e["top_logprobs"][0]["token"]
        assert e["logprob"] == max(t["logprob"] for t in e["top_logprobs"])
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == ref.text
    bare = ask(server, True, stream, max_tokens=3, temperature=0, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert len(bare) == 3 and all(e["top_logprobs"] == [] for e in bare)
    assert ask(server, True, stream, max_tokens=3, temperature=0)["choices"][0]["logprobs"] is None


def test_logprobs_end_with_the_text_at_a_stop_string(server):
    """Streamed or not, the same log-probs: those of the tokens kept before the stop string (all of its
    text when it starts on a token boundary; a token straddling it is dropped, as its tokens are)."""
    tokenizer, ids = server["tokenizer"], server["refs"]["plain"].token_ids
    text = tokenizer.decode(ids)
    j = next(j for j in range(6, len(ids)) if len(tokenizer.decode([ids[j]])) >= 3
             and text.find(tokenizer.decode([ids[j]])) == len(tokenizer.decode(ids[:j])))
    boundary = tokenizer.decode([ids[j]])
    straddling = text[len(tokenizer.decode(ids[:j])) + 1:][:3]  # starts inside token j
    for stop in (boundary, straddling):
        kw = dict(prompt=STORY, max_tokens=16, temperature=0, logprobs=1, stop=[stop], extra_body={"ignore_eos": True})
        whole, streamed = (ask(server, False, stream, **kw)["choices"][0] for stream in (False, True))
        assert whole == streamed and whole["finish"] == "stop" and whole["text"] == text[: text.find(stop)]
        assert whole["text"].startswith("".join(whole["logprobs"]["tokens"]))
        assert len(whole["logprobs"]["tokens"]) == j
    assert "".join(whole["logprobs"]["tokens"]) == tokenizer.decode(ids[:j])


@pytest.mark.parametrize("chat", [False, True])
@STREAM
def test_n_choices_are_seeded_per_choice(server, chat, stream):
    ref = server["refs"]["chat_n" if chat else "n"]
    out = ask(server, chat, stream, n=len(ref.outputs), temperature=0.9, seed=N_SEED, max_tokens=6)
    assert sorted(out["choices"]) == list(range(len(ref.outputs)))
    assert [out["choices"][i]["text"] for i in range(len(ref.outputs))] == [o.text for o in ref.outputs]
    assert out["usage"]["completion_tokens"] == sum(len(o.token_ids) for o in ref.outputs)
    assert out["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    if not stream:  # choice i is the request with n=1 and seed choice_seed(seed, i)
        alone = ask(server, chat, False, temperature=0.9, seed=choice_seed(N_SEED, 1), max_tokens=6)
        assert alone["choices"][0]["text"] == ref.outputs[1].text


@STREAM
def test_best_of_is_refused_unless_it_is_n(server, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).completions.create(model=server["model"], prompt=PROMPT, max_tokens=2, best_of=3,
                                          stream=stream)
    assert e.value.param == "best_of" and "best_of" in e.value.message
    out = ask(server, False, stream, max_tokens=2, n=2, best_of=2)
    assert sorted(out["choices"]) == [0, 1]


@STREAM
def test_presence_and_frequency_penalties(server, stream):
    refs = server["refs"]
    out = ask(server, False, stream, prompt=STORY, max_tokens=16, temperature=0, extra_body={"ignore_eos": True},
              **PENALTIES)
    assert out["choices"][0]["text"] == refs["penalties"].text != refs["plain"].text


@STREAM
def test_repetition_penalty_and_min_p_as_in_vllm(server, stream):
    refs = server["refs"]
    out = ask(server, False, stream, prompt=STORY, max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True, "repetition_penalty": 1.5})
    assert out["choices"][0]["text"] == refs["repetition"].text != refs["plain"].text
    out = ask(server, False, stream, prompt=STORY, max_tokens=12, temperature=1.2, seed=3, extra_body={"min_p": 0.2})
    assert out["choices"][0]["text"] == refs["min_p"].text


@STREAM
def test_logit_bias(server, stream):
    refs = server["refs"]
    out = ask(server, False, stream, prompt=STORY, max_tokens=16, temperature=0, extra_body={"ignore_eos": True},
              logit_bias={str(refs["first"]): -100})
    assert out["choices"][0]["text"] == refs["bias"].text != refs["plain"].text
    assert refs["bias"].token_ids[0] != refs["first"]


@STREAM
def test_usage_max_completion_tokens_and_fingerprint(server, stream):
    out = ask(server, True, stream, max_tokens=50, max_completion_tokens=5, temperature=0,
              extra_body={"ignore_eos": True})
    usage = out["usage"]
    assert usage["completion_tokens"] == 5 and out["choices"][0]["finish"] == "length"
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5 and usage["prompt_tokens"] > 5
    (fingerprint,) = out["fingerprints"]  # every chunk carries the same one
    assert fingerprint.startswith("fp_")
    assert ask(server, False, stream, max_tokens=2)["fingerprints"] == {fingerprint}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"five": 1}}, "logit_bias"),
    ("/v1/completions", {"n": 129}, "n"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
])
def test_out_of_range_values_are_400_naming_the_field(server, path, body, param):
    base = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    r = post({"base": server["base"]}, path, {**base, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]
    ok = post({"base": server["base"]}, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@STREAM
def test_out_of_range_through_the_openai_client(server, stream):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "x"}],
                                  logprobs=True, top_logprobs=25, stream=stream)
    assert e.value.status_code == 400 and e.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=server["model"], prompt="x", presence_penalty=3, stream=stream)
    assert e.value.param == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=server["model"], prompt="x", extra_body={"min_p": 1.5}, stream=stream)
    assert e.value.param == "min_p"
    assert c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
