"""SSD (in-process drafter): greedy output identical to AR with hits, misses and forced misses;
sampled output follows the target's distribution, with and without Saguaro sampling."""

import itertools

import pytest

from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.ssd import LocalDrafter, SSDEngine
from saguaro.sampling import SamplingParams, target_probs
from saguaro.ssd.drafter import SSDDrafter
from saguaro.ssd.fanout import geometric_fanout
from saguaro.ssd.online import SaguaroPolicy
from tests.test_sd_exactness import (N_SAMPLES, REDUCED_HEAD, SMALL_VOCAB, STOP, VOCAB, chi2_pvalue, exact_joint,
                                     prompts, run)
from tests.tiny import perturbed, tiny_model


def ssd_engine(target, draft, k, fanout, fallback="neural", c=1.0, vocab=VOCAB, max_batch=64, lookup_min_match=0):
    drafter = SSDDrafter(draft, vocab, k, fanout, c=c, fallback=fallback)
    return SSDEngine(target, LocalDrafter(drafter), k, STOP if vocab == VOCAB else set(), max_batch_size=max_batch,
                     prompt_lookup_min_match=lookup_min_match)


@pytest.mark.parametrize("fallback", ["neural", "ngram", "none"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("forced_miss", [False, True])
def test_greedy_ssd_equals_ar(fallback, batch, forced_miss):
    params = SamplingParams(temperature=0, max_tokens=24)
    hits = lookups = 0
    for seed, k in itertools.product(range(2), (1, 2, 3, 5)):
        target = tiny_model(seed, VOCAB)
        draft = perturbed(target, seed, 0.05)
        fanout = [0] * (k + 1) if forced_miss else geometric_fanout(3 * (k + 1), k, 0.7, 0.6)
        ps = prompts(seed * 10 + k, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        got, seqs = run(ssd_engine(target, draft, k, fanout, fallback), ps, params)
        assert got == want, (seed, k)
        hits += sum(s.stats.cache_hits for s in seqs)
        lookups += sum(s.stats.cache_lookups for s in seqs)
    assert lookups > 0
    if forced_miss:
        assert hits == 0
    else:
        assert hits > lookups / 2  # a close draft with fan-out mostly hits


@pytest.mark.parametrize("min_match", [1, 2])
@pytest.mark.parametrize("forced_miss", [False, True])
def test_greedy_ssd_with_prompt_lookup_first_equals_ar(min_match, forced_miss):
    params = SamplingParams(temperature=0, max_tokens=24)
    lookups = 0
    for seed, k in itertools.product(range(2), (1, 3)):
        target = tiny_model(seed, VOCAB)
        draft = perturbed(target, seed, 0.05)
        fanout = [0] * (k + 1) if forced_miss else geometric_fanout(3 * (k + 1), k, 0.7, 0.6)
        ps = prompts(seed * 10 + k, 4)
        want, _ = run(AREngine(target, STOP), ps, params)
        got, seqs = run(ssd_engine(target, draft, k, fanout, lookup_min_match=min_match), ps, params)
        assert got == want, (seed, k)
        lookups += sum(s.stats.lookup_rounds for s in seqs)
    assert lookups > 0


def test_sampled_rows_never_take_prompt_lookup():
    target, draft, prompt = stat_setup()
    seqs = [Sequence(list(prompt) * 3, SamplingParams(temperature=1.0, max_tokens=3, seed=i)) for i in range(20)]
    engine = ssd_engine(target, draft, 2, [2, 1, 2], vocab=SMALL_VOCAB, max_batch=20, lookup_min_match=1)
    engine.run(seqs)
    assert sum(s.stats.lookup_rounds for s in seqs) == 0 and sum(s.stats.rounds for s in seqs) > 0


def policy_engine(target, draft, k, fallback, c=1.0, vocab=VOCAB, max_batch=64):
    """An engine whose fan-out is refitted every 2 rounds and whose fallback may change per round."""
    policy = SaguaroPolicy(k, 3 * (k + 1), 0.6, 0.5, fallback=fallback, fit=True, refit_every=2)
    drafter = SSDDrafter(draft, vocab, k, policy.fanout, c=c)
    stop = STOP if vocab == VOCAB else set()
    return SSDEngine(target, LocalDrafter(drafter), k, stop, max_batch_size=max_batch, policy=policy)


@pytest.mark.parametrize("fallback", ["auto", "none"])
def test_greedy_ssd_with_online_policy_equals_ar(fallback):
    params = SamplingParams(temperature=0, max_tokens=24)
    for seed, k in itertools.product(range(2), (2, 4)):
        target = tiny_model(seed, VOCAB)
        draft = perturbed(target, seed, 0.3)
        ps = prompts(seed * 10 + k, 4)
        want, _ = run(AREngine(target, STOP), ps, params)
        engine = policy_engine(target, draft, k, fallback)
        got, _ = run(engine, ps, params)
        assert got == want, (seed, k)
        assert engine.policy.rounds > 2 and sum(engine.policy.bands["greedy"].lookups.values()) > 0


def test_mixed_batch_with_banded_policy_keeps_greedy_rows_equal_to_ar():
    """Greedy and sampled rows in one batch: rounds take the sampled band's fan-out, the greedy rows
    still follow AR token for token, and each band learned from its own rows."""
    target = tiny_model(4, VOCAB)
    draft = perturbed(target, 4, 0.3)
    ps = prompts(44, 4)
    greedy = SamplingParams(temperature=0, max_tokens=24)
    want, _ = run(AREngine(target, STOP), ps[:2], greedy)
    engine = policy_engine(target, draft, 3, "auto")
    seqs = [Sequence(p, greedy) for p in ps[:2]] + [
        Sequence(p, SamplingParams(temperature=1.0, max_tokens=24, seed=i)) for i, p in enumerate(ps[2:])]
    engine.run(seqs)
    assert [s.output_ids for s in seqs[:2]] == want
    assert engine.policy.bands["sampled"].rounds > 0 and engine.policy.bands["greedy"].drafted > 0
    assert engine.policy.bands["sampled"].drafted > 0


def ssd_samples(target, draft, prompt, temperature, k, fanout, c, fallback="neural", policy=False):
    seqs = [Sequence(list(prompt), SamplingParams(temperature=temperature, max_tokens=3, seed=i))
            for i in range(N_SAMPLES)]
    engine = (policy_engine(target, draft, k, fallback, c, SMALL_VOCAB, N_SAMPLES) if policy
              else ssd_engine(target, draft, k, fanout, fallback, c, SMALL_VOCAB, N_SAMPLES))
    engine.run(seqs)
    return [tuple(s.output_ids) for s in seqs], seqs


def stat_setup():
    target = tiny_model(11, SMALL_VOCAB, scale=0.6)
    draft = tiny_model(12, SMALL_VOCAB, scale=0.6)  # disagrees with the target
    return target, draft, [1, 4, 2, 1, 4]


@pytest.mark.parametrize("temperature, c, fanout", [
    (0.7, 1.0, [2, 1, 2]), (1.0, 1.0, [2, 1, 2]), (0.7, 0.5, [2, 1, 2]), (1.0, 0.5, [2, 1, 2]),
    (1.0, 0.5, [0, 0, 0]),  # forced misses
])
def test_sampled_ssd_follows_target_distribution(temperature, c, fanout):
    target, draft, prompt = stat_setup()
    samples, seqs = ssd_samples(target, draft, prompt, temperature, 2, fanout, c)
    assert chi2_pvalue(samples, exact_joint(target, prompt, temperature)) > 0.01
    hits = sum(s.stats.cache_hits for s in seqs)
    assert (hits == 0) if fanout == [0, 0, 0] else (hits > 0)


@pytest.mark.parametrize("fallback", ["ngram", "none"])
def test_sampled_ssd_with_other_fallbacks_follows_target_distribution(fallback):
    target, draft, prompt = stat_setup()
    samples, _ = ssd_samples(target, draft, prompt, 1.0, 2, [1, 1, 1], 0.5, fallback)
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) > 0.01


def test_sampled_ssd_with_online_policy_follows_target_distribution():
    target, draft, prompt = stat_setup()
    samples, _ = ssd_samples(target, draft, prompt, 0.7, 2, None, 0.5, "auto", policy=True)
    assert chi2_pvalue(samples, exact_joint(target, prompt, 0.7)) > 0.01


def test_sampled_ssd_with_reduced_draft_head_follows_target_distribution():
    target, _, prompt = stat_setup()
    draft = tiny_model(12, SMALL_VOCAB, scale=0.6, output_token_ids=REDUCED_HEAD)
    samples, seqs = ssd_samples(target, draft, prompt, 1.0, 2, [2, 1, 2], 0.5)
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) > 0.01
    assert sum(s.stats.cache_hits for s in seqs) > 0


class DrafterIgnoringC(SSDDrafter):
    """Negative control: draws from sigma_{F,C}(q) but hands the verifier the plain q."""

    def _draw(self, logits, rows, top_f):
        token, _ = super()._draw(logits, rows, top_f)
        return token, target_probs(logits, [r.params for r in rows])


def test_negative_control_verifier_ignoring_c_fails():
    target, draft, prompt = stat_setup()
    drafter = DrafterIgnoringC(draft, SMALL_VOCAB, 2, [2, 1, 2], c=0.0)
    seqs = [Sequence(list(prompt), SamplingParams(temperature=1.0, max_tokens=3, seed=i)) for i in range(N_SAMPLES)]
    SSDEngine(target, LocalDrafter(drafter), 2, set(), max_batch_size=N_SAMPLES).run(seqs)
    samples = [tuple(s.output_ids) for s in seqs]
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) < 0.01
