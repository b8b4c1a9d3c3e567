"""Loading a draft checkpoint for a target: the draft shares the target's embeddings and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saguaro.loader import CheckpointError, load_model, resolve_checkpoint
from saguaro.models.feature_draft import FEATURE_DRAFT_KEY
from saguaro.models.transformer import CausalLM


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
    return draft


def load_draft(path, target: CausalLM, tokenizer) -> CausalLM:
    draft_dir = resolve_checkpoint(path)
    draft = load_model(draft_dir, dtype=target.dtype, device=str(target.device), embeddings_from=target)
    check_vocabulary(draft_dir, draft, target, tokenizer)
    return draft
