"""Shared fixtures: tiny random Llama/Qwen3 checkpoints saved to disk, and the embedded target."""

from __future__ import annotations

import functools
import os

import pytest
import torch

# Tests run the eager float32 forward unless they ask otherwise (tests/test_compiled.py builds its own
# compiled step): compiling every model a test loads would take minutes, and exactness is checked per
# dtype and path where it matters. Subprocesses the tests start inherit these.
os.environ.setdefault("SAGUARO_COMPILE", "0")
os.environ.setdefault("SAGUARO_DTYPE", "float32")
# Mode auto's clocks are not remembered across tests (nor read from the developer's cache): each test's
# engine measures for itself. tests/test_auto_memory.py turns it on in a temporary directory.
os.environ.setdefault("SAGUARO_AUTO_MEMORY", "0")


def tiny_hf_model(arch: str, seed: int = 0, vocab: int = 96, layers: int = 2):
    """A tiny random HF model of the given family (transformers is the reference implementation)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
        model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # HF's init is tiny; spread the logits so argmax is decisive
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def tiny_checkpoint(request, tmp_path_factory):
    """(arch, path) of a tiny random checkpoint in HF format."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_hf_model(request.param).save_pretrained(path)
    return request.param, path


@functools.cache
def _embedded():
    from saguaro.embedded import embedded_target_path
    from saguaro.loader import load_model, resolve_checkpoint
    from saguaro.tokenizer import Tokenizer

    path = embedded_target_path()
    model = load_model(path)
    return path, model, Tokenizer.load(resolve_checkpoint(path), model.config.eos_token_ids)


@pytest.fixture(scope="session")
def embedded():
    """(gguf path, model, tokenizer) of the embedded SmolLM2-135M target, loaded once."""
    return _embedded()


@pytest.fixture(scope="session")
def draft_dir(embedded, tmp_path_factory):
    """A small (untrained) draft of the embedded target saved like a distilled one: acceptance is
    irrelevant to exactness."""
    from saguaro.distill.draft import build_draft, save_draft

    _, target, _ = embedded
    path = tmp_path_factory.mktemp("draft")
    save_draft(build_draft(target, [0, 1], list(range(4096))), path, dtype=torch.float32)
    return path
