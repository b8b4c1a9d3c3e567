"""Loading a draft checkpoint for a target: the draft shares the target's embeddings and tokenizer."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from saguaro.gguf_blocks import quantized_blocks
from saguaro.loader import CheckpointError, cache_root, load_model, resolve_checkpoint
from saguaro.models import cpu_kernels
from saguaro.models.feature_draft import FEATURE_DRAFT_KEY
from saguaro.models.linear import drop_dense_weights, use_file_blocks, use_kernels
from saguaro.models.transformer import CausalLM

log = logging.getLogger(__name__)

# How a bfloat16 draft on a CPU with AVX512_VNNI multiplies: its linears quantized to this GGUF block
# format, with int8 activations ("q4_1", "q8_0"), or "none" (bfloat16). Read from the environment so
# that a spawned or listening draft worker follows the same setting.
DRAFT_BLOCKS_ENV = "SAGUARO_DRAFT_BLOCKS"
DRAFT_BLOCKS_DEFAULT = "q4_1"


def on_cpu_kernels(draft: CausalLM) -> str:
    """Put a CPU draft on saguaro's kernels; returns what its linears multiply by ("dense", "q4_1_i8").

    A draft's arithmetic is free: verification keeps the output exact whatever q the draft proposes. So
    where the CPU has AVX512_VNNI, a bfloat16 draft's linears become Q4_1 blocks multiplied with int8
    activations (csrc/int8_block_linear.cpp), and their dense copy goes. On the embedded pair that made
    a draft step 1.0 ms instead of 2.4 (one thread), with greedy agreement with the target unchanged
    (0.305 / 0.231 against 0.310 / 0.228 on held-out HumanEval / ShareGPT prompts, teacher-forced)."""
    if draft.device.type != "cpu":
        return "dense"
    kernel_dir = cache_root() / "kernels"
    fmt = os.environ.get(DRAFT_BLOCKS_ENV, DRAFT_BLOCKS_DEFAULT)
    if fmt not in (*cpu_kernels.BLOCK_FORMATS, "none"):
        raise ValueError(f"${DRAFT_BLOCKS_ENV} must be one of {cpu_kernels.BLOCK_FORMATS + ('none',)}, got {fmt!r}")
    taken = []
    if fmt != "none" and draft.dtype == torch.bfloat16 and cpu_kernels.int8_supported():
        taken = use_file_blocks(draft, quantized_blocks(draft, fmt), kernel_dir, int8_activations=True)
    use_kernels(draft, kernel_dir)  # the attention kernel, and the bf16 kernel for any linear left
    if not taken:
        return "dense"
    drop_dense_weights(draft)
    log.info("draft: %d linears on %s blocks with int8 activations", len(taken), fmt)
    return f"{fmt}{cpu_kernels.INT8}"


def is_feature_checkpoint(path) -> bool:
    """Whether a draft checkpoint is a feature-conditioned draft (it reads the target's hidden states)."""
    if path in (None, "ngram"):
        return False
    config = resolve_checkpoint(path) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get(FEATURE_DRAFT_KEY))


def check_vocabulary_size(draft_vocab: int, target_vocab: int) -> None:
    if draft_vocab > target_vocab:
        raise CheckpointError(f"draft vocabulary ({draft_vocab}) is larger than the target's "
                              f"({target_vocab}): it cannot share the target's tokenizer")


def check_draft_checkpoint(path, target_vocab: int, tokenizer) -> None:
    """check_vocabulary from the draft's files alone (before a worker process loads it)."""
    draft_dir = resolve_checkpoint(path)
    vocab = json.loads((draft_dir / "config.json").read_text()).get("vocab_size", 0)
    check_vocabulary_size(vocab, target_vocab)
    check_tokenizer(draft_dir, tokenizer)


def check_vocabulary(draft_dir: Path, draft: CausalLM, target: CausalLM, tokenizer) -> None:
    """Refuse a draft whose token ids do not mean the same strings as the target's."""
    check_vocabulary_size(draft.config.vocab_size, target.config.vocab_size)
    check_tokenizer(draft_dir, tokenizer)


def check_tokenizer(draft_dir: Path, tokenizer) -> None:
    tok_file = draft_dir / "tokenizer.json"
    if tok_file.is_file():
        draft_vocab = json.loads(tok_file.read_text()).get("model", {}).get("vocab", {})
        target_vocab = tokenizer.hf.get_vocab()
        if isinstance(draft_vocab, dict):
            bad = [t for t, i in draft_vocab.items() if target_vocab.get(t) != i]
            if bad:
                raise CheckpointError(f"draft tokenizer does not map onto the target's: {len(bad)} tokens "
                                      f"differ, e.g. {bad[0]!r}")


def load_draft_alone(path, embeddings: torch.Tensor, target_vocab: int, dtype: torch.dtype,
                     device: str) -> CausalLM:
    """A draft in a process without its target (the SSD worker): the target's embedding matrix
    alone (loader.load_embeddings). Its tokenizer is the engine's to check (check_draft_checkpoint)."""
    draft = load_model(path, dtype=dtype, device=device, embeddings=embeddings)
    check_vocabulary_size(draft.config.vocab_size, target_vocab)
    on_cpu_kernels(draft)
    return draft


def load_draft(path, target: CausalLM, tokenizer) -> CausalLM:
    draft_dir = resolve_checkpoint(path)
    draft = load_model(draft_dir, dtype=target.dtype, device=str(target.device), embeddings_from=target)
    check_vocabulary(draft_dir, draft, target, tokenizer)
    on_cpu_kernels(draft)
    return draft
