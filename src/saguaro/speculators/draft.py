"""Loading a draft checkpoint for a target: the draft shares the target's embeddings and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from saguaro.loader import CheckpointError, load_model, resolve_checkpoint
from saguaro.models.transformer import CausalLM


def check_vocabulary(draft_dir: Path, draft: CausalLM, target: CausalLM, tokenizer) -> None:
    """Refuse a draft whose token ids do not mean the same strings as the target's."""
    if draft.config.vocab_size > target.config.vocab_size:
        raise CheckpointError(f"draft vocabulary ({draft.config.vocab_size}) is larger than the target's "
                              f"({target.config.vocab_size}): it cannot share the target's tokenizer")
    tok_file = draft_dir / "tokenizer.json"
    if tok_file.is_file():
        draft_vocab = json.loads(tok_file.read_text()).get("model", {}).get("vocab", {})
        target_vocab = tokenizer.hf.get_vocab()
        if isinstance(draft_vocab, dict):
            bad = [t for t, i in draft_vocab.items() if target_vocab.get(t) != i]
            if bad:
                raise CheckpointError(f"draft tokenizer does not map onto the target's: {len(bad)} tokens "
                                      f"differ, e.g. {bad[0]!r}")


def load_draft(path, target: CausalLM, tokenizer) -> CausalLM:
    draft_dir = resolve_checkpoint(path)
    draft = load_model(draft_dir, dtype=target.dtype, device=str(target.device), embeddings_from=target)
    check_vocabulary(draft_dir, draft, target, tokenizer)
    return draft
