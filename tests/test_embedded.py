"""End-to-end on the embedded SmolLM2-135M target: equal to HF transformers, batching invariant."""

import pytest
import torch

from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Once upon a time, in a small village,",
    "import numpy as np\n\ndef softmax(x):",
]


def ar_generate(model, tokenizer, prompts, max_tokens=32, batch=True, **params):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True) if not params \
        else SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)
    engine = AREngine(model, tokenizer.stop_token_ids)
    seqs = [Sequence(tokenizer.encode(p), sp) for p in prompts]
    if batch:
        engine.run(seqs)
    else:
        for s in seqs:
            engine.run([s])
    return [s.output_ids for s in seqs]


def test_greedy_matches_hf_transformers(embedded):
    path, model, tokenizer = embedded
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours = ar_generate(model, tokenizer, PROMPTS, max_tokens=40)
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([tokenizer.encode(prompt)])
        ref = hf.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == ref[0, ids.shape[1]:].tolist(), prompt


def test_batched_equals_one_at_a_time(embedded):
    _, model, tokenizer = embedded
    assert ar_generate(model, tokenizer, PROMPTS) == ar_generate(model, tokenizer, PROMPTS, batch=False)


def test_seeded_sampling_is_reproducible_and_batch_invariant(embedded):
    _, model, tokenizer = embedded
    a = ar_generate(model, tokenizer, PROMPTS[:2], max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    b = ar_generate(model, tokenizer, PROMPTS[:2], max_tokens=12, temperature=0.8, top_p=0.9, seed=7, batch=False)
    assert a == b
    c = ar_generate(model, tokenizer, PROMPTS[:2], max_tokens=12, temperature=0.8, top_p=0.9, seed=8)
    assert a != c


def test_stops_at_eos_and_max_tokens(embedded):
    _, model, tokenizer = embedded
    engine = AREngine(model, tokenizer.stop_token_ids)
    chat = tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    s = Sequence(chat, SamplingParams(temperature=0, max_tokens=200))
    engine.run([s])
    assert s.finish_reason == "stop" and s.output_ids[-1] in tokenizer.stop_token_ids
    s = Sequence(chat, SamplingParams(temperature=0, max_tokens=3))
    engine.run([s])
    assert s.finish_reason == "length" and len(s.output_ids) == 3


def test_bfloat16_batched_equals_one_at_a_time(embedded):
    """In bfloat16 the attention span sits on a block boundary and attention runs in float32, so a
    row's numbers do not depend on the rows batched with it."""
    path, _, tokenizer = embedded
    from saguaro.loader import load_model

    model = load_model(path, dtype=torch.bfloat16)
    assert ar_generate(model, tokenizer, PROMPTS) == ar_generate(model, tokenizer, PROMPTS, batch=False)


def test_prefill_groups_bound_the_padding():
    from saguaro.engine.base import prefill_groups

    lengths = [5, 300, 6, 98, 7, 100, 5]
    groups = prefill_groups(lengths, 1.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)
    assert groups == [[0, 6, 2, 4], [3, 5], [1]]  # shortest first
    assert prefill_groups(lengths, float("inf")) == [[0, 6, 2, 4, 3, 5, 1]]
    assert prefill_groups([], 1.25) == []


def test_prefill_in_groups_equals_one_padded_batch(embedded):
    """Prompts of very different lengths: prefilled in groups (the default) or as one padded batch, the
    same tokens, greedy and seeded."""
    _, model, tokenizer = embedded
    prompts = [PROMPTS[0], "word " * 60 + "and so", PROMPTS[2], "x = 1\n" * 30, PROMPTS[1]]
    for params in ({}, {"temperature": 0.8, "seed": 3}):
        outs = []
        for slack in (float("inf"), 1.25):
            engine = AREngine(model, tokenizer.stop_token_ids)
            engine.prefill_slack = slack
            sp = SamplingParams(max_tokens=12, ignore_eos=True, **(params or {"temperature": 0}))
            seqs = [Sequence(tokenizer.encode(p), sp) for p in prompts]
            engine.run(seqs)
            outs.append([s.output_ids for s in seqs])
        assert outs[0] == outs[1]
