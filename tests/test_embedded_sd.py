"""SD on the embedded target: greedy output identical to AR, with neural and n-gram speculators."""

import pytest
import torch

from saguaro.distill.draft import build_draft
from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.speculative import SDEngine, check_vocabulary, load_draft
from saguaro.engine.speculators import NeuralSpeculator, NgramSpeculator
from saguaro.loader import CheckpointError
from saguaro.sampling import SamplingParams

PROMPTS = [
    "def is_prime(n):",
    "List three colors of the rainbow:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\ndef fib(n):",
]


def outputs(engine, tokenizer, max_tokens=32):
    seqs = [Sequence(tokenizer.encode(p), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            for p in PROMPTS]
    engine.run(seqs)
    return [s.output_ids for s in seqs], seqs


@pytest.fixture(scope="module")
def ar_reference(embedded):
    _, target, tokenizer = embedded
    return outputs(AREngine(target, tokenizer.stop_token_ids), tokenizer)[0]


def test_sd_with_untrained_draft_equals_ar(embedded, ar_reference):
    _, target, tokenizer = embedded
    draft = build_draft(target, [0, 1], list(range(8192)))  # acceptance is irrelevant to exactness
    engine = SDEngine(target, NeuralSpeculator(draft, target.config.vocab_size), 4, tokenizer.stop_token_ids)
    got, _ = outputs(engine, tokenizer)
    assert got == ar_reference


def test_sd_with_ngram_equals_ar(embedded, ar_reference):
    _, target, tokenizer = embedded
    got, seqs = outputs(SDEngine(target, NgramSpeculator(), 4, tokenizer.stop_token_ids), tokenizer)
    assert got == ar_reference
    assert sum(s.stats.accepted for s in seqs) > 0  # the copy-heavy prompt gets accepted lookups


def test_draft_with_foreign_vocabulary_is_refused(embedded, tmp_path):
    _, target, tokenizer = embedded
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": {"hello": 0, "world": 1}}}')
    draft = build_draft(target, [0], [0, 1])
    with pytest.raises(CheckpointError, match="does not map"):
        check_vocabulary(tmp_path, draft, target, tokenizer)
