"""Speculative decoding (SD): a speculator proposes K tokens, the target verifies them in one forward."""

from __future__ import annotations

import logging
import time

import torch

from saguaro.engine.base import Engine
from saguaro.engine.scoring import emitted_logprobs, verify_round
from saguaro.engine.ssd_setup import make_ssd_engine
from saguaro.loader import CheckpointError
from saguaro.models.transformer import CausalLM
from saguaro.speculators import NeuralSpeculator, NgramSpeculator, Speculator
from saguaro.loader import cache_root
from saguaro.models import cpu_kernels
from saguaro.models.linear import use_kernels
from saguaro.speculators.draft import check_vocabulary, load_draft
from saguaro.ssd.options import SSDOptions

__all__ = ["SDEngine", "check_vocabulary", "load_draft", "make_speculative_engine"]  # the draft loaders: old path

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
        accepted, emitted, logp = verify_round(logits, seqs, proposal.tokens,
                                               lambda p: None if proposal.q is None else proposal.q.to(p.dtype))
        t2 = time.perf_counter()
        self.cache.lengths += accepted + 1  # the fed last token plus the accepted proposals
        accepted_list, emitted_list = accepted.tolist(), emitted.tolist()
        drafted = proposal.tokens.tolist()
        out = [row[:a] + [t] for row, a, t in zip(drafted, accepted_list, emitted_list)]
        for s, a, row, lps in zip(seqs, accepted_list, out, emitted_logprobs(logp, seqs, out)):
            s.append(row, self.stop_ids, lps)
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


def make_speculative_engine(mode, target, tokenizer, draft, k, stop, max_batch_size, default_draft=None,
                            target_path=None, ssd: SSDOptions | None = None):
    if draft == "ngram":
        if mode == "ssd":
            raise ValueError("SSD pre-drafts with a neural draft; --draft ngram is for sd (or --fallback ngram)")
        return SDEngine(target, NgramSpeculator(), k, stop, max_batch_size)
    path = draft or default_draft
    if path is None:
        raise CheckpointError("no draft model: pass --draft PATH (a checkpoint sharing the target's "
                              "tokenizer) or --draft ngram")
    if mode == "sd":
        draft_model = load_draft(path, target, tokenizer)
        if draft_model.device.type == "cpu" and cpu_kernels.loaded():  # loaded with the target's compiled step
            use_kernels(draft_model, cache_root() / "kernels")
        speculator = NeuralSpeculator(draft_model, target.config.vocab_size)
        return SDEngine(target, speculator, k, stop, max_batch_size)
    if mode == "ssd":
        return make_ssd_engine(target, tokenizer, path, target_path, k, stop, max_batch_size, ssd)
    raise ValueError(f"unknown mode {mode!r}")
