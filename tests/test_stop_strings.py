"""Stop strings end generation (the engine cuts the tokens, every face reads the same checker), and
prompt lookup honours a required match longer than the matcher's default 3."""

from __future__ import annotations

import io

import pytest
import torch

from saguaro.chat import reply
from saguaro.llm import LLM
from saguaro.sampling import SamplingParams
from saguaro.serve.detokenizer import StopStrings
from saguaro.speculators import NgramSpeculator
from saguaro.ssd.drafter import DraftRow, SSDDrafter
from tests.tiny import tiny_model

PROMPT = "def fibonacci"  # greedy: "(n)\n\ndef fibonacci(n):\n    if n == 1:\n        return 1\n    else"
MAX_TOKENS = 24
ALIGNED = ["(", "\n\n", " if", "):"]  # each starts on a token boundary
STRADDLING = ["if", "return", "n =="]  # each starts inside a token (" if", " return", " n")


@pytest.fixture(scope="module")
def llm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than two on a busy 2-core machine
    with LLM(mode="ar") as llm:
        yield llm
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0]
    assert out.outputs[0].finish_reason == "length"
    return out.text, out.token_ids


def greedy(stop: list[str]) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=stop)


@pytest.mark.parametrize("stop", ALIGNED + STRADDLING)
def test_stop_string_ends_generation_and_token_ids(llm, reference, stop):
    ref_text, ref_ids = reference
    out = llm.generate(PROMPT, greedy([stop]))[0]
    decoded = llm.tokenizer.decode(out.token_ids)
    assert out.outputs[0].finish_reason == "stop"
    assert out.text == ref_text[: ref_text.find(stop)]  # everything before the stop string, as OpenAI
    assert out.token_ids == ref_ids[: len(out.token_ids)] and len(out.token_ids) < len(ref_ids)
    assert out.metrics["generated_tokens"] == len(out.token_ids)
    # the tokens end where the text ends: the longest prefix whose text comes before the stop string
    assert out.text.startswith(decoded)
    assert not out.text.startswith(llm.tokenizer.decode(ref_ids[: len(out.token_ids) + 1]))
    if stop in ALIGNED:
        assert decoded == out.text


def test_earliest_of_several_stop_strings_wins(llm, reference):
    out = llm.generate(PROMPT, greedy(["return", "if", "nowhere"]))[0]
    assert out.text == reference[0][: reference[0].find("if")] and out.outputs[0].finish_reason == "stop"
    absent = llm.generate(PROMPT, greedy(["nowhere"]))[0]
    assert (absent.text, absent.token_ids, absent.outputs[0].finish_reason) == (*reference, "length")


def test_speculative_mode_stops_like_ar(llm):
    """SD appends several tokens a round (prompt lookup repeats "def fibonacci"), some past the stop
    string: they are dropped, and text, tokens and finish reason are AR's."""
    ar_engine = llm.engine
    prompts = [PROMPT, "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci"]
    stops = ["):", "return", "n =="]
    params = [greedy([s]) for s in stops for _ in prompts]
    want = llm.generate(prompts * len(stops), params)
    llm.engine = llm.make_engine("sd", "ngram", k=4)
    try:
        got = llm.generate(prompts * len(stops), params)
    finally:
        llm.engine.close()
        llm.engine = ar_engine
    for w, g in zip(want, got):
        assert (g.text, g.token_ids, g.outputs[0].finish_reason) == (w.text, w.token_ids, w.outputs[0].finish_reason)
    assert any(g.metrics.get("tokens_per_round", 1) > 1 for g in got)  # rounds did add several tokens


def test_chat_streams_what_the_api_returns(llm):
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    params = SamplingParams(temperature=0, max_tokens=16, stop=[" "])
    out = llm.chat(messages, params)
    stream = io.StringIO()
    text, seq = reply(llm, messages, params, stream)
    assert out.outputs[0].finish_reason == seq.finish_reason == "stop"
    assert text == stream.getvalue() == out.text and " " not in text
    assert seq.output_ids == out.token_ids


def test_stop_strings_checker_needs_a_stop_string(llm):
    assert StopStrings.for_params(llm.tokenizer, []) is None
    assert StopStrings.for_params(llm.tokenizer, [""]) is None


# ---------------------------------------------------------------------- prompt lookup, min match > 3
TOKENS = [1, 2, 3, 4, 5, 9, 9, 3, 4, 5, 7, 1, 2, 3, 4, 5]  # ends in a 5-gram seen at 0; its 3-gram last at 7


def test_ngram_matcher_searches_longer_suffixes_on_request():
    matcher = NgramSpeculator()
    assert matcher.match(TOKENS, 2) == ([7, 1], 3)  # the default stops at 3: the latest 3-gram
    assert matcher.match(TOKENS, 2, max_ngram=6) == ([9, 9], 5)


@pytest.mark.parametrize("min_match, want", [(5, [9, 9]), (4, [9, 9]), (6, None), (3, [7, 1]), (2, [7, 1])])
def test_lookup_min_match_above_three_still_looks_up(min_match, want):
    k = 2
    drafter = SSDDrafter(tiny_model(0), 32, k, [2, 1, 1])
    drafter.set_policy([2, 1, 1], "neural", prompt_lookup_min_match=min_match)
    spec = drafter._prompt_lookup(DraftRow(0, SamplingParams(temperature=0), list(TOKENS), None), cached=False)
    assert (spec.tokens if spec is not None else None) == want
    if spec is not None:
        assert spec.source == "lookup" and spec.q is None
