"""The distilled draft that ships in the repo: intact, as recorded, and still agreeing with its target."""

import json

import pytest
import torch

from saguaro.distill.draft import MANIFEST, file_digests
from saguaro.distill.evaluate import match_sequences
from saguaro.embedded import DRAFT_DIR, embedded_draft_path
from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.speculative import load_draft
from saguaro.sampling import SamplingParams

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "def is_palindrome(s: str) -> bool:\n    \"\"\"Return True if s reads the same backwards.\"\"\"\n",
    "Give me three tips for writing clear emails.",
]
RECORDED_MIN = 0.4  # the recorded held-out eval is 0.431 / 0.429 (HumanEval / ShareGPT)
MIN_AGREEMENT = 0.15  # measured 0.26 on these 4 prompts; an untrained 2-layer draft gives ~0.04, a broken export ~0


def test_draft_ships_and_matches_its_manifest():
    assert embedded_draft_path() == DRAFT_DIR
    recorded = {}
    for line in (DRAFT_DIR / MANIFEST).read_text().splitlines():
        digest, name = line.split()
        recorded[name] = digest
    assert recorded == file_digests(DRAFT_DIR)


def test_draft_config_is_the_recorded_design():
    cfg = json.loads((DRAFT_DIR / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 576
    assert cfg["saguaro_embeddings_from_target"] is True
    assert len(cfg["saguaro_output_token_ids"]) == 8192
    for held_out in ("humaneval", "sharegpt"):
        assert cfg["saguaro_distill"]["eval"][held_out]["agreement"] > RECORDED_MIN
    assert (DRAFT_DIR / "model.safetensors").stat().st_size < 40 * 2**20


@pytest.mark.slow
def test_draft_agrees_with_target_on_fixed_prompts(embedded):
    _, target, tokenizer = embedded
    draft = load_draft(DRAFT_DIR, target, tokenizer)
    seqs = [Sequence(tokenizer.encode_chat([{"role": "user", "content": p}]),
                     SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)) for p in PROMPTS]
    AREngine(target, tokenizer.stop_token_ids).run(seqs)
    width = max(len(s.all_ids) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s.all_ids)] = torch.tensor(s.all_ids)
    shard = {"tokens": tokens, "ends": torch.tensor([len(s.all_ids) for s in seqs]),
             "prompt_lengths": torch.tensor([len(s.prompt_ids) for s in seqs])}
    matches = [m for row in match_sequences(draft, shard) for m in row]
    assert len(matches) == 4 * 32
    assert sum(matches) / len(matches) >= MIN_AGREEMENT
