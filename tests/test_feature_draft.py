"""The feature-conditioned draft: its unrolled training passes are what it computes when drafting."""

from __future__ import annotations

import itertools

import pytest
import torch

from saguaro.distill.evaluate import solve_ap
from saguaro.distill.feature_eval import chain_rounds
from saguaro.distill.feature_train import chain_loss, labelled_logits, step_weights
from saguaro.distill.forced import topk_with_tail
from saguaro.distill.train import target_to_draft_index
from saguaro.engine.auto import MeasuredRounds, RoundChoice
from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.speculative import SDEngine
from saguaro.models.feature_draft import build_feature_draft, chain_mask
from saguaro.sampling import SamplingParams
from saguaro.speculators import FeatureSpeculator, NeuralSpeculator
from tests.test_sd_exactness import (
    N_SAMPLES, SMALL_VOCAB, STOP, VOCAB, chi2_pvalue, exact_joint, prompts, run, sd_samples,
)
from tests.tiny import perturbed, tiny_model


def _draft(seed: int = 0):
    target = tiny_model(seed, vocab=40, layers=3)
    draft = build_feature_draft(target, [2], list(range(0, 40, 2)))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if not name.startswith("embed."):
                p.add_(0.3 * torch.randn_like(p))
    return target, draft.eval()


def test_chain_mask_is_causal_at_depth_one_and_sees_its_chain_deeper():
    assert torch.equal(chain_mask(5, 1), torch.ones(5, 5, dtype=torch.bool).tril())
    m = chain_mask(6, 3)  # step 3 at position 4: chain starts at 2
    assert m[4, :6].nonzero().flatten().tolist() == [0, 1, 2]
    assert m[4, 6:12].nonzero().flatten().tolist() == [3]
    assert m[4, 12:].nonzero().flatten().tolist() == [4]


def test_unrolled_passes_equal_step_by_step_drafting():
    """Pass d at position i == drafting step d from a cache holding positions < i-d+1 fed with the
    target's states, the chain's earlier steps fed with the draft's own guesses."""
    target, draft = _draft()
    tokens = torch.randint(0, 40, (1, 12))
    cache = target.new_cache(1, 16)
    states = target.hidden_states(tokens, cache)[0]
    feats = torch.cat([torch.zeros_like(states[:1]), states[:-1]])[None]
    chains = draft.forward_chains(tokens, feats, 4)
    for start in (0, 3, 7):  # the chain's first position n: its feature is the target's state at n-1
        c = draft.new_cache(1, 32)
        if start:
            draft.draft_step(tokens[:, :start], feats[:, :start], c)
            c.lengths += start
        feat = feats[:, start : start + 1]
        for d in range(1, 5):
            i = start + d - 1
            logits, guess = draft.draft_step(tokens[:, i : i + 1], feat, c)
            c.lengths += 1
            torch.testing.assert_close(logits[0, -1], chains[d - 1][0, i], rtol=1e-9, atol=1e-9)
            feat = guess


def test_a_wrong_mask_breaks_the_equality():
    """Negative control: pass 2 seeing pass-1 keys up to its own position (not its chain's start) differs."""
    target, draft = _draft(1)
    tokens = torch.randint(0, 40, (1, 10))
    states = target.hidden_states(tokens, target.new_cache(1, 16))[0]
    feats = torch.cat([torch.zeros_like(states[:1]), states[:-1]])[None]
    good = draft.forward_chains(tokens, feats, 2)[1]
    import saguaro.models.feature_draft as fd

    real = fd.chain_mask
    try:
        fd.chain_mask = lambda t, d, device=None: torch.cat(
            [torch.ones(t, t, dtype=torch.bool).tril()] + [torch.eye(t, dtype=torch.bool)] * (d - 1), 1)
        bad = draft.forward_chains(tokens, feats, 2)[1]
    finally:
        fd.chain_mask = real
    assert not torch.allclose(good[0, 2:], bad[0, 2:])


def test_step_weights_need_the_chain_start_labelled():
    w = torch.tensor([[0.0, 0, 1, 1, 1, 1, 0]])
    ws = step_weights(w, 3)
    assert ws[0].tolist() == w.tolist()
    assert ws[1].tolist() == [[0, 0, 0, 1, 1, 1, 0]]
    assert ws[2].tolist() == [[0, 0, 0, 0, 1, 1, 0]]


def test_chain_loss_is_zero_at_the_teacher_and_descends():
    _, draft = _draft(2)
    draft = draft.float()
    index = target_to_draft_index(draft.output_token_ids, 40)
    logits = torch.randn(1, 6, 20) * 3
    full = torch.full((1, 6, 40), -1e4)
    full[..., draft.output_token_ids] = logits  # a teacher that only emits head tokens
    ids, lp, out = topk_with_tail(full[0], 20)
    ids, probs, out = ids[None], lp.float().exp()[None], out[None]
    weight = torch.tensor([[0.0, 1, 1, 1, 1, 0]])
    at_teacher = chain_loss([logits, logits], ids, probs, out, weight, index)
    assert float(at_teacher) < 1e-3
    assert float(chain_loss([torch.zeros_like(logits)] * 2, ids, probs, out, weight, index)) > float(at_teacher) + 0.1


def test_rounds_and_ap():
    t, f = True, False
    matches = [[t, t, f, t, t, t], [t, t, t, f, t, t], [f, t, t, t, t, t], [t] * 6]
    # start 0: step1@0 t, step2@1 t, step3@2 t, step4@3 t -> 4; next start 5: step1@5 t, then end
    assert chain_rounds(matches, 0, 7, 4) == [4, 1]
    assert abs(solve_ap(0.5 + 0.25 + 0.125 + 0.0625, 4) - 0.5) < 1e-9


# --------------------------------------------------------------------------- SD with a feature draft



def feature_draft(target, seed: int, head=None, noise: float = 0.3):
    vocab = target.config.vocab_size
    draft = build_feature_draft(target, [len(target.layers) - 1], head or list(range(vocab)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if not name.startswith("embed."):
                p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return draft.eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sd_with_a_feature_draft_equals_ar(batch):
    params = SamplingParams(temperature=0, max_tokens=24)
    accepted = 0
    for seed, k in itertools.product(range(2), (1, 2, 4, 6)):
        target = tiny_model(seed, VOCAB)
        ps = prompts(seed * 10 + k, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        got, seqs = run(SDEngine(target, FeatureSpeculator(feature_draft(target, seed), VOCAB), k, STOP), ps, params)
        assert got == want, (seed, k)
        accepted += sum(s.stats.accepted for s in seqs)
    assert accepted > 0


def test_feature_draft_stops_and_max_tokens_like_ar():
    target = tiny_model(5, VOCAB)
    ps = prompts(5, 4)
    free, _ = run(AREngine(target, set()), ps, SamplingParams(temperature=0, max_tokens=30))
    stop = {free[0][7]}
    for max_tokens in (1, 2, 5, 13):
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        want, _ = run(AREngine(target, stop), ps, params)
        got, _ = run(SDEngine(target, FeatureSpeculator(feature_draft(target, 1), VOCAB), 4, stop), ps, params)
        assert got == want


REDUCED_HEAD = [5, 0, 3, 11, 2, 7, 1, 9]


def _stat_setup():
    target = tiny_model(11, SMALL_VOCAB, scale=0.6)
    return target, feature_draft(target, 3, REDUCED_HEAD, noise=0.5), [1, 4, 2, 1, 4]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_sd_with_a_feature_draft_follows_target_distribution(temperature):
    target, draft, prompt = _stat_setup()
    samples = sd_samples(target, FeatureSpeculator(draft, SMALL_VOCAB), prompt, temperature, k=2)
    assert chi2_pvalue(samples, exact_joint(target, prompt, temperature)) > 0.01


class _WrongQ(FeatureSpeculator):
    """Negative control: tells the verifier a q other than the one its tokens were drawn from."""

    def propose(self, seqs, k):
        proposal = super().propose(seqs, k)
        proposal.q = torch.softmax(torch.log(proposal.q.clamp_min(1e-30)) * 0.3, -1)
        return proposal


def test_negative_control_a_wrong_q_fails():
    target, draft, prompt = _stat_setup()
    samples = sd_samples(target, _WrongQ(draft, SMALL_VOCAB), prompt, 1.0, k=2)
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) < 0.01


def test_the_loss_over_labelled_positions_only_is_the_full_loss():
    _, draft = _draft(4)
    draft = draft.float()
    index = target_to_draft_index(draft.output_token_ids, 40)
    tokens = torch.randint(0, 40, (2, 9))
    feats = torch.randn(2, 9, draft.config.hidden_size)
    ids = torch.randint(0, 40, (2, 9, 5)).int()
    probs = torch.softmax(torch.randn(2, 9, 5), -1) * 0.9
    outside = torch.full((2, 9), 0.1)
    weight = torch.zeros(2, 9)
    weight[0, 2:8], weight[1, 4:7] = 1, 1
    full = chain_loss(draft.forward_chains(tokens, feats, 3), ids, probs, outside, weight, index)
    part = chain_loss(labelled_logits(draft, tokens, feats, weight, 3), ids, probs, outside, weight, index)
    torch.testing.assert_close(part, full)


class _Switching:
    """A round rule that switches between SD and AR every `period` rounds, starting with `first`."""

    def __init__(self, first: str, period: int = 1):
        self.modes = [first, "ar" if first == "sd" else "sd"]
        self.period, self.calls = period, 0

    def __call__(self, batch, sampled):
        mode = self.modes[(self.calls // self.period) % 2]
        self.calls += 1
        return RoundChoice(mode, f"test: {mode}")

    def observe(self, *args) -> None:
        pass


@pytest.mark.parametrize("draft_kind", ["feature", "tokens"])
@pytest.mark.parametrize("rule", ["sd-first", "ar-first", "ar-stretch", "measured"])
def test_greedy_auto_sd_equals_ar_across_switches(draft_kind, rule):
    """Mode auto on an SD engine: AR rounds between speculative ones (the feature draft keeps the state of
    each plainly decoded token) leave greedy output token-identical to AR."""
    params = SamplingParams(temperature=0, max_tokens=24)
    ran = {"ar": 0, "sd": 0}
    for seed, k, batch in itertools.product(range(2), (2, 4), (1, 3)):
        target = tiny_model(seed, VOCAB)
        spec = (FeatureSpeculator(feature_draft(target, seed), VOCAB) if draft_kind == "feature"
                else NeuralSpeculator(perturbed(target, seed, 0.05), VOCAB))
        make = {"sd-first": lambda: _Switching("sd"), "ar-first": lambda: _Switching("ar"),
                "ar-stretch": lambda: _Switching("ar", 3),
                "measured": lambda: MeasuredRounds(speculative="sd", warmup=2, explore_every=3)}[rule]
        ps = prompts(seed * 10 + k, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        got, seqs = run(SDEngine(target, spec, k, STOP, round_rule=make()), ps, params)
        assert got == want, (seed, k, batch)
        for s in seqs:
            ran["ar"] += s.stats.ar_rounds
            ran["sd"] += s.stats.rounds
            assert s.metrics()["mode"] in ("sd", "ar", "sd+ar")
    assert ran["ar"] > 0 and (ran["sd"] > 0 or rule == "measured")


def test_sampled_auto_sd_with_a_feature_draft_follows_target_distribution():
    target, draft, prompt = _stat_setup()
    seqs = [Sequence(list(prompt), SamplingParams(temperature=1.0, max_tokens=3, seed=i)) for i in range(N_SAMPLES)]
    SDEngine(target, FeatureSpeculator(draft, SMALL_VOCAB), 2, set(), max_batch_size=N_SAMPLES,
             round_rule=_Switching("sd")).run(seqs)
    samples = [tuple(s.output_ids) for s in seqs]
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) > 0.01


# --------------------------------------------------------------------------- a saved feature draft, end to end

@pytest.fixture(scope="module")
def feature_draft_dir(embedded, tmp_path_factory):
    from saguaro.distill.draft import save_draft

    _, target, _ = embedded
    path = tmp_path_factory.mktemp("feature-draft")
    save_draft(feature_draft(target, 0, list(range(4096)), noise=0.01), path, dtype=torch.float32)
    return path


def test_a_saved_feature_draft_loads_as_one_and_runs_sd_exactly(embedded, feature_draft_dir):
    from saguaro import LLM
    from saguaro.loader import load_model
    from saguaro.models.feature_draft import FeatureDraft
    from saguaro.speculators.draft import is_feature_checkpoint

    _, target, _ = embedded
    assert is_feature_checkpoint(feature_draft_dir) and not is_feature_checkpoint("ngram")
    loaded = load_model(feature_draft_dir, embeddings_from=target)
    assert isinstance(loaded, FeatureDraft) and loaded.fuse.weight.abs().sum() > 0
    prompts_ = ["def fibonacci(n):", "The capital of France is"]
    params = SamplingParams(temperature=0, max_tokens=16)
    with LLM(mode="ar", compile=False) as ar, LLM(mode="sd", draft=str(feature_draft_dir), compile=False) as sd:
        want = [o.token_ids for o in ar.generate(prompts_, params)]
        outs = sd.generate(prompts_, params)
        assert [o.token_ids for o in outs] == want
        assert sum(o.metrics.get("rounds", 0) for o in outs) > 0
    with pytest.raises(ValueError, match="feature-conditioned"):
        LLM(mode="ssd", draft=str(feature_draft_dir), compile=False)
    with LLM(draft=str(feature_draft_dir), compile=False) as auto:  # mode auto: SD or AR per round
        out = auto.generate(prompts_[:1], params)[0]
        assert out.token_ids == want[0] and out.metrics["mode"] in ("sd", "ar", "sd+ar")


def test_auto_remembers_its_clocks_for_the_next_process_on_the_same_setup(feature_draft_dir, monkeypatch, tmp_path):
    """What one LLM's mode auto measured, the next one on the same setup starts from (engine/auto_memory.py)."""
    from saguaro import LLM
    from saguaro.engine import ssd_setup

    monkeypatch.setenv("SAGUARO_AUTO_MEMORY", "1")
    monkeypatch.setattr(ssd_setup, "cache_root", lambda: tmp_path)
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)  # past both warm-ups
    with LLM(draft=str(feature_draft_dir), compile=False) as first:
        assert first.mode == "auto" and not first.engine.round_rule.clocks  # nothing to start from
        first.generate("def add(a, b):", params)
    assert (tmp_path / "auto" / "clocks.json").is_file()
    with LLM(draft=str(feature_draft_dir), compile=False) as second:
        recalled = second.engine.round_rule.remembered()
        assert set(recalled) == {"greedy/sd", "greedy/ar"}
        assert "measuring" not in second.engine.round_rule(1, 0).reason  # it chooses from its first round
