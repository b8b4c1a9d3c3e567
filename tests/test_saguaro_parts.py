"""Saguaro's three parts as pure functions: fan-out, sampling sigma_{F,C}, the speedup model."""

import pytest
import torch

from saguaro.ssd.fanout import geometric_fanout, geometric_weights, round_to_budget, uniform_fanout
from saguaro.ssd.sampling import residual_mass_on, saguaro_distribution
from saguaro.ssd.speedup import expected_tokens, fallback_switch_batch, ssd_speedup


@pytest.mark.parametrize("a, r, k", [(0.6, 0.5, 4), (0.8, 1.0, 3), (0.3, 2.0, 6)])
def test_geometric_weights_match_closed_form(a, r, k):
    w = geometric_weights(k, a, r)
    for i in range(k):
        assert w[i] == pytest.approx(a ** (i / (1 + r)))
    assert w[k] == pytest.approx(a ** (k / (1 + r)) * (1 - a) ** (-1 / (1 + r)))
    # the optimum of sum_k P_k (1 - F_k^-r) under sum F_k = B: F_k ~ P_k^(1/(1+r))
    probs = [a**i * (1 - a) for i in range(k)] + [a**k]
    ratio = [wi / pi ** (1 / (1 + r)) for wi, pi in zip(w, probs)]
    assert max(ratio) == pytest.approx(min(ratio))


def test_geometric_fanout_is_optimal_among_integer_neighbours():
    a, r, k, budget = 0.7, 0.8, 4, 40
    probs = [a**i * (1 - a) for i in range(k)] + [a**k]

    def hit(f):
        return sum(p * (1 - fi ** -r) for p, fi in zip(probs, f) if fi > 0)

    best = geometric_fanout(budget, k, a, r)
    assert sum(best) == budget
    for i in range(k + 1):  # moving one branch anywhere does not help
        for j in range(k + 1):
            if i != j and best[i] > 1:
                moved = list(best)
                moved[i] -= 1
                moved[j] += 1
                assert hit(moved) <= hit(best) + 1e-9


@pytest.mark.parametrize("budget", [0, 1, 7, 16, 63])
def test_rounding_meets_budget(budget):
    f = geometric_fanout(budget, 5, 0.65, 0.7)
    assert sum(f) == budget and all(x >= 0 for x in f)
    assert sum(uniform_fanout(budget, 5)) == budget
    assert round_to_budget([1, 1, 2], 4) == [1, 1, 2]


def test_fanout_rejects_bad_parameters():
    with pytest.raises(ValueError):
        geometric_weights(4, 1.0, 0.5)
    with pytest.raises(ValueError):
        geometric_weights(4, 0.5, 0.0)


def test_saguaro_distribution_scales_top_f():
    q = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    got = saguaro_distribution(q, 2, 0.5)
    assert got.sum() == pytest.approx(1.0)
    assert got[0] / got[3] == pytest.approx(0.5 * 0.5 / 0.1)
    assert torch.equal(saguaro_distribution(q, 2, 1.0), q)
    assert torch.equal(saguaro_distribution(torch.tensor([1.0, 0.0]), 1, 0.0), torch.tensor([1.0, 0.0]))


def test_residual_mass_on_cached_tokens_rises_as_c_falls():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.softmax(torch.randn(50, generator=g, dtype=torch.float64) * 2, -1)
        q = torch.softmax(torch.randn(50, generator=g, dtype=torch.float64) * 2, -1)
        top = q.topk(5).indices
        shares = [float(residual_mass_on(p, saguaro_distribution(q, 5, c), top)) for c in (1.0, 0.75, 0.5, 0.25, 0.0)]
        assert all(b >= a - 1e-12 for a, b in zip(shares, shares[1:]))
        assert shares[-1] > shares[0]


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_speedup_model_limits():
    e = expected_tokens(0.7, 4)
    assert ssd_speedup(1.0, e, 1.0, 0.5, 0.3) == pytest.approx(e)  # all hits, draft hidden
    assert ssd_speedup(1.0, e, 1.0, 1.5, 0.3) == pytest.approx(e / 1.5)  # draft slower than verify
    assert ssd_speedup(0.0, e, 2.0, 0.5, 0.3) == pytest.approx(2.0 / 1.3)  # all misses
    assert ssd_speedup(0.0, e, 2.0, 1.5, 0.3) == pytest.approx(2.0 / 1.8)  # a miss waits for the tree too
    assert ssd_speedup(0.9, e, e, 0.5, 0.3, batch=8) < ssd_speedup(0.9, e, e, 0.5, 0.3, batch=1)


def test_switch_batch_is_where_ngram_overtakes_neural():
    kw = dict(p_hit=0.9, tokens_hit=expected_tokens(0.7, 4), t_primary=0.5,
              tokens_neural=expected_tokens(0.7, 4), t_neural=0.4,
              tokens_ngram=expected_tokens(0.3, 4), t_ngram=0.01)
    b = fallback_switch_batch(**kw)
    assert b is not None and b > 1

    def speeds(batch):
        n = ssd_speedup(kw["p_hit"], kw["tokens_hit"], kw["tokens_neural"], kw["t_primary"], kw["t_neural"], batch)
        g = ssd_speedup(kw["p_hit"], kw["tokens_hit"], kw["tokens_ngram"], kw["t_primary"], kw["t_ngram"], batch)
        return n, g

    n, g = speeds(b - 1)
    assert g < n
    n, g = speeds(b)
    assert g >= n
    # a backup as accurate as the draft and faster wins at once; a neural backup as fast never loses
    assert fallback_switch_batch(**{**kw, "tokens_ngram": kw["tokens_neural"]}) == 1
    assert fallback_switch_batch(**{**kw, "t_neural": kw["t_ngram"]}, max_batch=64) is None


def test_fit_power_law_recovers_r():
    from saguaro.ssd.online import fit_power_law

    for r in (0.3, 0.8, 1.5):
        lookups = {f: 100_000 for f in (2, 4, 8, 16)}
        hits = {f: round(n * (1 - f**-r)) for f, n in lookups.items()}
        assert fit_power_law(lookups, hits) == pytest.approx(r, rel=0.02)
    assert fit_power_law({1: 10}, {1: 5}) is None  # F = 1 says nothing about the slope


def test_fit_acceptance_shrinks_to_prior():
    from saguaro.ssd.online import fit_acceptance

    assert fit_acceptance(0, 0, 0.6) == pytest.approx(0.6)
    assert fit_acceptance(300, 1000, 0.6) == pytest.approx(0.3, abs=0.01)


def test_choose_fallback_follows_b_star():
    from saguaro.ssd.online import FallbackCosts, choose_fallback

    costs = FallbackCosts(p_hit=0.9, tokens_hit=expected_tokens(0.7, 4), t_primary=0.5,
                          tokens_neural=expected_tokens(0.7, 4), t_neural=0.4,
                          tokens_ngram=expected_tokens(0.3, 4), t_ngram=0.01)
    b_star = fallback_switch_batch(**vars(costs))
    assert b_star is not None and b_star > 1
    assert choose_fallback(b_star - 1, costs) == "neural"
    assert choose_fallback(b_star, costs) == "ngram"


def test_policy_refits_fanout_towards_observed_acceptance():
    from saguaro.ssd.online import SaguaroPolicy

    k, budget = 3, 16
    policy = SaguaroPolicy(k, budget, acceptance=0.9, r=0.5, refit_every=4)
    prior = list(policy.fanout)
    for _ in range(40):  # a draft that is almost always rejected at once
        policy.observe(0, k, 0, False, "neural", policy.fanout)
        policy.observe_times(0.1, 0.05, 0.01, "neural", 1)
    assert sum(policy.fanout) == budget
    assert policy.fanout[0] > prior[0]  # outcome k=0 is the likely one: it gets more branches
    fixed = SaguaroPolicy(k, budget, acceptance=0.9, r=0.5, fit=False, refit_every=4)
    for _ in range(40):
        fixed.observe(0, k, 0, False, "neural", fixed.fanout)
        fixed.observe_times(0.1, 0.05, 0.01, "neural", 1)
    assert fixed.fanout == prior


def test_auto_fallback_measures_both_backups_before_choosing():
    from saguaro.ssd.online import EXPLORE_MISSED_ROUNDS, SaguaroPolicy

    k = 3
    policy = SaguaroPolicy(k, 12, acceptance=0.5, r=0.5, fallback="auto")
    tried = []
    for _ in range(4 * EXPLORE_MISSED_ROUNDS):
        backup = policy.next_fallback(1)
        tried.append(backup)
        accepted = 3 if backup == "ngram" else 0  # here the n-gram backup is both free and better
        policy.observe(accepted, k, 0, False, backup, policy.fanout)
        policy.observe_times(0.1, 0.05, 0.001 if backup == "ngram" else 0.05, backup, 1)
    assert tried[:2 * EXPLORE_MISSED_ROUNDS] == ["neural"] * EXPLORE_MISSED_ROUNDS + ["ngram"] * EXPLORE_MISSED_ROUNDS
    assert set(tried[2 * EXPLORE_MISSED_ROUNDS:]) == {"ngram"}


def test_fit_budget_sizes_the_tree_to_the_verification():
    from saguaro.ssd.online import TREE_SHARE, fit_budget

    assert fit_budget(16, tree_s=TREE_SHARE * 0.03, verify_s=0.03, k=3) == 16  # already the right size
    assert fit_budget(16, tree_s=0.01, verify_s=0.03, k=3) == 32  # room for more: at most doubles
    assert fit_budget(16, tree_s=0.048, verify_s=0.03, k=3) == 8  # too slow: at most halves
    assert fit_budget(5, tree_s=1.0, verify_s=0.03, k=3) == 4  # never below one branch per outcome
    assert fit_budget(200, tree_s=0.001, verify_s=0.03, k=3, max_budget=256) == 256


def test_policy_grows_the_budget_while_the_tree_is_cheap():
    from saguaro.ssd.online import SaguaroPolicy

    k = 3
    policy = SaguaroPolicy(k, 12, acceptance=0.5, r=0.5, refit_every=4, adapt_budget=True)
    for _ in range(8):
        policy.observe(1, k, 1, True, "neural", policy.fanout)
        policy.observe_times(verify_s=0.03, tree_s=0.006, fallback_s=0.0, source="neural", misses=0)
    assert policy.budget == 48 and sum(policy.fanout) == 48
    fixed = SaguaroPolicy(k, 12, acceptance=0.5, r=0.5, refit_every=4)
    for _ in range(8):
        fixed.observe_times(verify_s=0.03, tree_s=0.006, fallback_s=0.0, source="neural", misses=0)
    assert fixed.budget == 12


def test_banded_policy_fits_sampled_rows_from_their_own_rounds():
    """Sampled rows that accept little shape the sampled band's fan-out towards early positions and
    leave the greedy band's fit alone; a round takes its rows' band."""
    from saguaro.ssd.online import BandedPolicy, SaguaroPolicy

    k = 4
    banded = BandedPolicy(SaguaroPolicy(k, 15, acceptance=0.6, r=0.5, refit_every=4))
    greedy_before = list(banded.bands["greedy"].fanout)
    for _ in range(40):
        policy = banded.select(sampled_rows=1)
        banded.observe(0, k, 0, False, "neural", policy.fanout, sampled=True)  # rejects at once
        banded.observe_times(verify_s=0.03, tree_s=0.01, fallback_s=0.0, source="neural", misses=1)
    assert banded.band == "sampled" and banded.fanout is banded.bands["sampled"].fanout
    assert banded.bands["greedy"].fanout == greedy_before and banded.bands["greedy"].rounds == 0
    a_sampled, _ = banded.fitted["sampled"]
    assert a_sampled < 0.2 < banded.fitted["greedy"][0]
    assert banded.bands["sampled"].fanout[0] > greedy_before[0]  # the budget moves to k = 0
    assert banded.select(sampled_rows=0) is banded.bands["greedy"] and banded.fanout == greedy_before
    banded.observe(k, k, k, True, "neural", greedy_before, sampled=False)
    assert banded.bands["greedy"].accepted == k and banded.bands["sampled"].accepted == 0


# ---------------------------------------------------------------------------- options and the drafter interface

def test_ssd_options_validate_and_take_the_older_names():
    from saguaro.ssd.online import PRIOR_ACCEPTANCE, PRIOR_R, SaguaroPolicy
    from saguaro.ssd.options import SSDOptions

    o = SSDOptions.of(fanout="uniform", lookup_min_match=0, draft_cores=[3])
    assert (o.fanout_shape, o.prompt_lookup_min_match, o.draft_cores) == ("uniform", 0, (3,))
    assert SSDOptions().acceptance == SaguaroPolicy(4, 15).acceptance == PRIOR_ACCEPTANCE  # one prior
    assert SSDOptions().r == SaguaroPolicy(4, 15).r == PRIOR_R
    for bad, flag in [({"acceptance": 1.0}, "--acceptance"), ({"saguaro_c": 2}, "--saguaro-c"),
                      ({"worker_timeout": 0}, "--worker-timeout"), ({"fallback": "x"}, "--fallback"),
                      ({"draft_worker": "nohost"}, "--draft-worker"), ({"lookup_min_match": -1}, "--lookup-min-match")]:
        with pytest.raises(ValueError, match=flag):
            SSDOptions.of(**bad)
    with pytest.raises(TypeError, match="unknown"):
        SSDOptions.of(fan_out=3)
    assert SSDOptions.of(draft_worker="10.0.0.2:7070").draft_worker == "10.0.0.2:7070"


def test_drafters_conform_to_the_protocol():
    from tests.tiny import tiny_model

    from saguaro.analyses.recorder import RoundRecorder
    from saguaro.ssd.client import RemoteDrafter
    from saguaro.ssd.drafter import SSDDrafter
    from saguaro.ssd.protocol import Drafter, LocalDrafter

    local = LocalDrafter(SSDDrafter(tiny_model(0), 32, 2, [2, 1, 1], fallback="ngram"))
    assert isinstance(local, Drafter)
    assert local.fixed_policy().fanout == [2, 1, 1] and local.fixed_policy().next_fallback(8) == "ngram"
    calls = ("prefill", "respond", "build_tree", "finish_tree", "retire", "close")
    for cls in (RemoteDrafter, RoundRecorder):  # structural: neither inherits from Drafter
        assert all(callable(getattr(cls, name, None)) for name in calls), cls
    assert isinstance(RoundRecorder(type("E", (), {"drafter": local, "totals": {}})()), Drafter)
