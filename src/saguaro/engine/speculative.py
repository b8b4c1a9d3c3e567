"""Speculative decoding (SD): a speculator proposes K tokens, the target verifies them in one forward."""

from __future__ import annotations

import logging
import time

import torch

from saguaro.engine.auto import MeasuredRounds, RoundRule
from saguaro.engine.auto_memory import RemembersClocks
from saguaro.engine.base import Engine, decode_one_token
from saguaro.engine.scoring import emitted_logprobs, verify_round
from saguaro.engine.ssd_setup import make_ssd_engine, remember_auto_clocks
from saguaro.loader import CheckpointError, cache_root
from saguaro.models.compiled import compile_step
from saguaro.models.transformer import CausalLM
from saguaro.models.feature_draft import FeatureDraft
from saguaro.speculators import FeatureSpeculator, NeuralSpeculator, NgramSpeculator, Speculator
from saguaro.speculators.draft import check_vocabulary, is_feature_checkpoint, load_draft
from saguaro.ssd.options import AUTO_MIN_CONFIDENCE, SSDOptions

__all__ = ["SDEngine", "check_vocabulary", "load_draft", "make_speculative_engine"]  # the draft loaders: old path

log = logging.getLogger(__name__)


class SDEngine(RemembersClocks, Engine):
    mode = "sd"

    def __init__(self, target: CausalLM, speculator: Speculator, k: int, stop_token_ids: set[int],
                 max_batch_size: int = 64, round_rule: RoundRule | None = None):
        """round_rule: mode "auto": whether the next round speculates or decodes one token (engine/auto.py),
        both on every core; None always speculates."""
        super().__init__(target, stop_token_ids, max_batch_size)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.speculator, self.k = speculator, k
        self.round_rule = round_rule
        if round_rule is not None:
            self.mode = "auto"
        self.totals = {"rounds": 0, "draft_s": 0.0, "verify_s": 0.0}

    @property
    def lookahead(self) -> int:
        return self.k + 1

    @property
    def wants_target_states(self) -> bool:
        return self.speculator.needs_target_states

    def on_prefill(self, seqs, ids, lengths, cache, states=None) -> None:
        self.speculator.prefill(seqs, ids, lengths, states)

    def on_retire(self, keep: list[int]) -> None:
        self.speculator.retire(keep)

    def decode_round(self) -> None:
        if self.round_rule is None:
            self._speculative_round()
            return
        self.measured_round(list(self.running), "sd", lambda choice: self._plain_round()
                            if choice.mode == "ar" else self._speculative_round())

    def _plain_round(self) -> None:
        """One token per row, no speculation; the speculator hears of it (a feature draft keeps the state)."""
        states = decode_one_token(self.target, self.cache, self.running, self.stop_ids,
                                  return_states=self.wants_target_states)
        self.speculator.decoded_plainly(states)

    def close(self) -> None:
        self.remember_clocks()

    def _speculative_round(self) -> None:
        seqs = self.running
        t0 = time.perf_counter()
        proposal = self.speculator.propose(seqs, self.k)
        t1 = time.perf_counter()
        last = torch.tensor([[s.last_token] for s in seqs])
        ids = torch.cat([last, proposal.tokens], 1).to(self.target.device)  # up to K+1 tokens a row
        states = None
        if self.wants_target_states:
            logits, states = self.target(ids, self.cache, return_hidden=True)  # [B, n+1, V], [B, n+1, H]
        else:
            logits = self.target(ids, self.cache)  # [B, n+1, V]
        accepted, emitted, logp = verify_round(logits, seqs, proposal.tokens,
                                               lambda p: None if proposal.q is None else proposal.q.to(p.dtype),
                                               proposal.lengths)
        t2 = time.perf_counter()
        self.cache.lengths += accepted + 1  # the fed last token plus the accepted proposals
        accepted_list, emitted_list = accepted.tolist(), emitted.tolist()
        drafted = proposal.tokens.tolist()
        proposed = ([len(drafted[0])] * len(seqs) if proposal.lengths is None else proposal.lengths.tolist())
        out = [row[:a] + [t] for row, a, t in zip(drafted, accepted_list, emitted_list)]
        for s, a, n, row, lps in zip(seqs, accepted_list, proposed, out, emitted_logprobs(logp, seqs, out)):
            s.append(row, self.stop_ids, lps)
            st = s.stats
            st.rounds += 1
            st.drafted += n
            st.accepted += a
            if proposal.from_lookup:
                st.lookup_rounds += 1
                st.accepted_on_lookup += a
            st.draft_s += t1 - t0
            st.verify_s += t2 - t1
        self.speculator.commit(accepted_list, states)
        self.totals["rounds"] += 1
        self.totals["draft_s"] += t1 - t0
        self.totals["verify_s"] += t2 - t1


# What mode auto's SD runs per band until the other mode measures clearly faster. Recorded on the
# embedded pair, 2-core EPYC, 8 held-out chat prompts x 128 tokens a dataset (docs/auto.md): SD that
# stops where its draft is unsure, with prompt lookup ahead of it, ran at 1.32-1.53x AR greedy, and
# without lookup at 0.97-1.06x at T = 0.7 and 1 (lookup is greedy-only); a policy deciding from its
# first rounds alone lost up to 6% to both on prompt-to-prompt swings.
SD_PRIOR = {"greedy": "sd", "sampled": "ar"}


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
        draft_model = load_draft(path, target, tokenizer)  # on saguaro's CPU kernels where they apply
        if target.compiled is not None and type(draft_model) is CausalLM:
            # its drafting steps compiled as well (once per machine, cached): 0.74 ms a step instead of
            # 1.87 eager on the embedded pair, bitwise the same logits; and the two-token step that starts
            # a round after a fully accepted one (the last proposal and the bonus token to read); with prompt
            # lookup, up to K + 2, what it reads after a lookup round it skipped (~8 s each to build, once)
            lookup = ssd is not None and ssd.prompt_lookup_min_match > 0
            reads = range(1, k + 3 if lookup else 3)
            draft_model.compiled = compile_step(draft_model, cache_root() / "compiled", [(t, None) for t in reads])
        auto = ssd is not None and ssd.auto
        if isinstance(draft_model, FeatureDraft):
            speculator = FeatureSpeculator(draft_model, target.config.vocab_size)
        else:
            confidence = ssd.min_confidence if ssd is not None else None
            if confidence is None:
                confidence = AUTO_MIN_CONFIDENCE if auto else 0.0
            speculator = NeuralSpeculator(draft_model, target.config.vocab_size, min_confidence=confidence,
                                          lookup_min_match=ssd.prompt_lookup_min_match if ssd is not None else 0)
        engine = SDEngine(target, speculator, k, stop, max_batch_size,
                          round_rule=MeasuredRounds(speculative="sd", prior=SD_PRIOR) if auto else None)
        if auto:
            remember_auto_clocks(engine, target, target_path, path, k,
                                 min_confidence=getattr(speculator, "min_confidence", None),
                                 lookup_min_match=getattr(speculator, "lookup_min_match", None))
        return engine
    if mode == "ssd":
        if is_feature_checkpoint(path):
            raise ValueError(f"{path} is a feature-conditioned draft, which SSD does not run yet (its worker "
                             "would need the target's hidden states): use mode 'sd'")
        return make_ssd_engine(target, tokenizer, path, target_path, k, stop, max_batch_size, ssd)
    raise ValueError(f"unknown mode {mode!r}")
