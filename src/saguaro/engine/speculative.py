"""Speculative decoding (SD): a speculator proposes K tokens, the target verifies them in one forward."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from saguaro.engine.base import Engine
from saguaro.engine.speculators import NeuralSpeculator, NgramSpeculator, Speculator
from saguaro.engine.verify import verify
from saguaro.loader import CheckpointError, load_model, resolve_checkpoint
from saguaro.models.transformer import CausalLM
from saguaro.sampling import target_probs

log = logging.getLogger(__name__)


class SDEngine(Engine):
    mode = "sd"

    def __init__(self, target: CausalLM, speculator: Speculator, k: int, stop_token_ids: set[int],
                 max_batch_size: int = 64):
        super().__init__(target, stop_token_ids, max_batch_size)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.speculator, self.k = speculator, k
        self.totals = {"rounds": 0, "draft_s": 0.0, "verify_s": 0.0}

    @property
    def lookahead(self) -> int:
        return self.k + 1

    def on_prefill(self, seqs, ids, lengths, cache) -> None:
        self.speculator.prefill(seqs, ids, lengths)

    def on_retire(self, keep: list[int]) -> None:
        self.speculator.retire(keep)

    def decode_round(self) -> None:
        seqs, k = self.running, self.k
        t0 = time.perf_counter()
        proposal = self.speculator.propose(seqs, k)
        t1 = time.perf_counter()
        last = torch.tensor([[s.last_token] for s in seqs])
        ids = torch.cat([last, proposal.tokens], 1).to(self.target.device)
        logits = self.target(ids, self.cache)  # [B, K+1, V]
        p = target_probs(logits, [s.params for s in seqs])
        q = None if proposal.q is None else proposal.q.to(p.dtype)
        accepted, emitted = verify(proposal.tokens.to(p.device), q, p, [s.generator for s in seqs])
        t2 = time.perf_counter()
        self.cache.lengths += accepted + 1  # the fed last token plus the accepted proposals
        accepted_list, emitted_list = accepted.tolist(), emitted.tolist()
        drafted = proposal.tokens.tolist()
        for s, a, t, row in zip(seqs, accepted_list, emitted_list, drafted):
            s.append(row[:a] + [t], self.stop_ids)
            st = s.stats
            st.rounds += 1
            st.drafted += k
            st.accepted += a
            st.draft_s += t1 - t0
            st.verify_s += t2 - t1
        self.speculator.commit(accepted_list)
        self.totals["rounds"] += 1
        self.totals["draft_s"] += t1 - t0
        self.totals["verify_s"] += t2 - t1


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


def make_speculative_engine(mode, target, tokenizer, draft, k, stop, max_batch_size, default_draft=None,
                            target_path=None, **ssd_options):
    if draft == "ngram":
        if mode == "ssd":
            raise ValueError("SSD pre-drafts with a neural draft; --draft ngram is for sd (or --fallback ngram)")
        return SDEngine(target, NgramSpeculator(), k, stop, max_batch_size)
    path = draft or default_draft
    if path is None:
        raise CheckpointError("no draft model: pass --draft PATH (a checkpoint sharing the target's "
                              "tokenizer) or --draft ngram")
    if mode == "sd":
        speculator = NeuralSpeculator(load_draft(path, target, tokenizer), target.config.vocab_size)
        return SDEngine(target, speculator, k, stop, max_batch_size)
    if mode == "ssd":
        from saguaro.engine.ssd_setup import make_ssd_engine

        return make_ssd_engine(target, tokenizer, path, target_path, k, stop, max_batch_size, **ssd_options)
    raise ValueError(f"unknown mode {mode!r}")
