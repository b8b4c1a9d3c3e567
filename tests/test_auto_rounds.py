"""mode "auto": the SSD engine runs AR rounds where speculation does not pay, and output stays exact
across every switch (greedy token-identical to AR; sampled rows follow the target's distribution)."""

import itertools

import pytest

from saguaro.engine.auto import MeasuredRounds, RoundChoice, StaticRule, choose_round
from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.ssd import LocalDrafter, SSDEngine
from saguaro.sampling import SamplingParams
from saguaro.ssd.drafter import SSDDrafter
from saguaro.ssd.fanout import geometric_fanout
from tests.test_sd_exactness import N_SAMPLES, SMALL_VOCAB, STOP, VOCAB, chi2_pvalue, exact_joint, prompts, run
from tests.test_ssd_exactness import stat_setup
from tests.tiny import perturbed, tiny_model


def test_choose_round_runs_ssd_only_for_one_greedy_row():
    assert choose_round(1, 0).mode == "ssd"
    assert choose_round(2, 0).mode == "ar"
    assert choose_round(1, 1).mode == "ar"
    assert choose_round(8, 3).mode == "ar"
    assert all(choose_round(b, s).reason for b, s in [(1, 0), (4, 0), (1, 1)])


class Alternating:
    """A rule that switches every `period` rounds, starting with `first`."""

    def __init__(self, first: str, period: int = 1):
        self.first, self.period, self.calls = first, period, 0

    def __call__(self, batch: int, sampled: int) -> RoundChoice:
        other = "ar" if self.first == "ssd" else "ssd"
        mode = self.first if (self.calls // self.period) % 2 == 0 else other
        self.calls += 1
        return RoundChoice(mode, f"test: {mode}")

    def observe(self, choice, batch, sampled, seconds, tokens) -> None:
        pass


def auto_engine(target, draft, k, rule, vocab=VOCAB, max_batch=64):
    drafter = SSDDrafter(draft, vocab, k, geometric_fanout(3 * (k + 1), k, 0.7, 0.6))
    return SSDEngine(target, LocalDrafter(drafter), k, STOP if vocab == VOCAB else set(), max_batch_size=max_batch,
                     round_rule=rule)


@pytest.mark.parametrize("rule", ["choose_round", "measured", "ssd-first", "ar-first", "ar-stretch"])
def test_greedy_auto_equals_ar_across_switches(rule):
    params = SamplingParams(temperature=0, max_tokens=24)
    ran = {"ar": 0, "ssd": 0}
    for seed, k, batch in itertools.product(range(2), (2, 4), (1, 3)):
        target = tiny_model(seed, VOCAB)
        draft = perturbed(target, seed, 0.05)
        make = {"choose_round": StaticRule, "measured": lambda: MeasuredRounds(warmup=2, explore_every=3),
                "ssd-first": lambda: Alternating("ssd"),
                "ar-first": lambda: Alternating("ar"), "ar-stretch": lambda: Alternating("ar", period=3)}[rule]
        ps = prompts(seed * 10 + k, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        engine = auto_engine(target, draft, k, make())
        got, seqs = run(engine, ps, params)
        assert got == want, (seed, k, batch)
        assert engine.mode == "auto"
        ran["ar"] += sum(s.stats.ar_rounds for s in seqs)
        ran["ssd"] += sum(s.stats.rounds for s in seqs)
        assert all(s.metrics()["auto_reason"] for s in seqs)
    assert ran["ar"] > 0 and ran["ssd"] > 0


class RecordingDrafter(SSDDrafter):
    """Keeps each just-in-time draft with the context it was drafted from."""

    jit_drafts: list

    def _draft_rows(self, rows):
        specs = super()._draft_rows(rows)
        self.jit_drafts = getattr(self, "jit_drafts", []) + [(list(self.rows[i].tokens), s.tokens)
                                                              for i, s in zip(rows, specs)]
        return specs


def test_drafter_catches_up_after_an_ar_stretch():
    """The first draft after AR rounds continues the real context (no stale tree tokens in the
    draft's cache): it equals the draft's own greedy continuation of that context."""
    target = tiny_model(0, VOCAB)
    draft = perturbed(target, 0, 0.05)
    k = 3
    drafter = RecordingDrafter(draft, VOCAB, k, geometric_fanout(3 * (k + 1), k, 0.7, 0.6))
    engine = SSDEngine(target, LocalDrafter(drafter), k, STOP, round_rule=Alternating("ar", period=4))
    seqs = [Sequence(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)) for p in prompts(5, 1)]
    engine.run(seqs)
    assert seqs[0].stats.ar_rounds >= 8 and len(drafter.jit_drafts) >= 3
    greedy = SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
    for context, tokens in drafter.jit_drafts:
        want, _ = run(AREngine(draft, set()), [context], greedy)
        assert tokens == want[0]


@pytest.mark.parametrize("first", ["ssd", "ar"])
def test_sampled_auto_follows_target_distribution_across_switches(first):
    target, draft, prompt = stat_setup()
    seqs = [Sequence(list(prompt), SamplingParams(temperature=1.0, max_tokens=3, seed=i)) for i in range(N_SAMPLES)]
    auto_engine(target, draft, 1, Alternating(first), vocab=SMALL_VOCAB, max_batch=N_SAMPLES).run(seqs)
    samples = [tuple(s.output_ids) for s in seqs]
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) > 0.01
    assert sum(s.stats.ar_rounds for s in seqs) > 0 and sum(s.stats.rounds for s in seqs) > 0


def test_drafter_skips_ar_batches_and_resyncs_when_one_row_is_left():
    """A batch runs AR without prefilling the drafter; when one greedy row is left, the drafter gets its
    whole context afresh and SSD rounds resume, still token-identical to AR."""
    target = tiny_model(1, VOCAB)
    draft = perturbed(target, 1, 0.05)
    k = 3
    lengths = [6, 12, 30]
    ps = prompts(7, 3)
    seqs = [Sequence(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)) for p, n in zip(ps, lengths)]
    drafter = SSDDrafter(draft, VOCAB, k, geometric_fanout(3 * (k + 1), k, 0.7, 0.6))
    engine = SSDEngine(target, LocalDrafter(drafter), k, STOP, round_rule=StaticRule())
    for s in seqs:
        engine.add(s)
    engine.step()  # prefill of the batch and its first (AR) round
    assert drafter.rows == []
    while engine.has_work():
        engine.step()
    for p, n, s in zip(ps, lengths, seqs):
        want, _ = run(AREngine(target, STOP), [p], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        assert s.output_ids == want[0]
    last = seqs[-1].stats
    assert last.ar_rounds > 0 and last.rounds > 0 and last.cache_hits > 0


def rounds_of(rule, n: int, ssd_s: float, ssd_tokens: int, ar_s: float = 0.020, batch: int = 1, sampled: int = 0):
    """The modes `rule` runs over `n` rounds: an SSD round emits `ssd_tokens` in `ssd_s`, an AR round one
    token in `ar_s`; the first round after a switch pays for it (10x), which the rule must not measure."""
    modes = []
    for _ in range(n):
        choice = rule(batch, sampled)
        switched = not modes or modes[-1] != choice.mode
        modes.append(choice.mode)
        seconds = (ssd_s if choice.mode == "ssd" else ar_s) * (10 if switched else 1)
        rule.observe(choice, batch, sampled, seconds, ssd_tokens if choice.mode == "ssd" else 1)
    return modes


def test_measured_rule_tries_both_then_keeps_the_faster_and_re_measures():
    rule = MeasuredRounds(warmup=4, explore_every=5, explore_tokens=4)
    # SSD emits 2 tokens in 25 ms, AR 1 token in 20 ms: SSD is 1.6x faster per token
    modes = rounds_of(rule, 40, ssd_s=0.025, ssd_tokens=2)
    assert modes[:8] == ["ssd"] * 3 + ["ar"] * 5  # each: one round to settle, then 4 timed tokens
    # the faster one for 5 x 1.6^2 = 13 rounds, then the slower one again, briefly (settle + 4 tokens);
    # pairs: the two warm-ups, AR's warm-up against the SSD run after it, that run's end against the block
    assert modes[8:21] == ["ssd"] * 13 and modes[21:26] == ["ar"] * 5 and modes[26] == "ssd"
    reason = rule(1, 0).reason
    assert "ssd measured faster" in reason and "side by side ssd 1.60x ar over 3 pair(s)" in reason
    # the bands are measured apart: sampled rows start over, and batches run AR
    assert rule(1, 1).mode == "ssd" and "sampled: measuring" in rule(1, 1).reason
    assert rule(4, 0).mode == "ar"


def test_speculation_takes_over_from_ar_only_when_clearly_faster_side_by_side():
    """Without a prior, a band runs AR unless speculation measured faster by `switch_margin` at the slow
    end of the side-by-side comparison (one standard error; `unknown_spread` below 3 pairs): 1.2x on one
    pair is not enough, 1.6x is; and AR takes over from running speculation at `switch_margin`."""
    def first_choice(ssd_s: float) -> str:
        rule = MeasuredRounds(warmup=4, explore_every=1000, explore_tokens=4)
        return rounds_of(rule, 9, ssd_s=ssd_s, ssd_tokens=2)[-1]

    assert first_choice(0.025) == "ssd"  # 1.6x
    assert first_choice(0.033) == "ar"  # 1.21x, one pair: 1.21 < e^0.2 x 1.08 = 1.32
    # negative control: the same 1.21x read from the clocks alone (no pair: runs too short to compare)
    rule = MeasuredRounds(warmup=2, explore_every=1000, explore_tokens=2)
    assert rounds_of(rule, 6, ssd_s=0.033, ssd_tokens=2)[-1] == "ssd"
    assert not rule.paired["greedy"].pairs


def test_a_drifting_machine_does_not_talk_the_rule_into_speculation():
    """A shared VM's speed drifts: SSD's clock, filled while the machine was fast, reads SSD 1.5x faster
    than AR's clock, filled since it slowed. Side by side, SSD measured 5% slower than the AR rounds
    around it, and AR keeps the band; the same clocks without a comparison (negative control) switch."""
    from saguaro.engine.auto import ModeClock

    def rule_with_clocks() -> MeasuredRounds:
        rule = MeasuredRounds(warmup=1, explore_every=10_000)
        rule.clocks[("greedy", "ssd")], rule.clocks[("greedy", "ar")] = ModeClock(), ModeClock()
        rule.clocks[("greedy", "ssd")].add(0.020, 1)
        rule.clocks[("greedy", "ar")].add(0.030, 1)
        return rule

    control = rule_with_clocks()
    assert control(1, 0).mode == "ssd"
    rule = rule_with_clocks()
    for _ in range(3):  # runs of 8 tokens taking turns, each SSD run 5% slower than the AR runs beside it
        for mode, seconds in (("ar", 0.030), ("ssd", 0.0315)):
            for _ in range(8):
                rule._pairs("greedy").add(mode, seconds, 1)
    assert rule(1, 0).mode == "ar" and "side by side ssd 0.95x ar" in rule(1, 0).reason


def test_measured_rule_follows_a_change_in_speed():
    rule = MeasuredRounds(warmup=1, explore_every=4, explore_tokens=1)
    ssd_s = 0.010
    seen = []
    for i in range(60):
        choice = rule(1, 0)
        seen.append(choice.mode)
        if i == 20:
            ssd_s = 0.050  # SSD turns slow (say, the draft stops matching)
        rule.observe(choice, 1, 0, ssd_s if choice.mode == "ssd" else 0.020, 1)
    assert seen[10:20].count("ssd") > seen[10:20].count("ar")
    assert seen[50:].count("ar") > seen[50:].count("ssd")


def test_measured_rule_re_measures_a_much_slower_mode_less_often():
    def explorations(ssd_s: float) -> int:
        rule = MeasuredRounds(warmup=1, explore_every=8, explore_tokens=0)
        modes = []
        for _ in range(200):
            choice = rule(1, 0)
            modes.append(choice.mode)
            rule.observe(choice, 1, 0, ssd_s if choice.mode == "ssd" else 0.020, 1)
        return modes[2:].count("ssd")

    assert explorations(0.040) < explorations(0.022)  # SSD at 0.5x AR is re-timed less than at 0.9x


def test_measured_rule_waits_longer_each_time_the_slower_mode_stays_slower():
    rule = MeasuredRounds(warmup=1, explore_every=8, explore_tokens=0, max_backoff=8)
    starts = []
    for i in range(800):
        choice = rule(1, 0)
        if "re-measuring" in choice.reason:
            starts.append(i)
        rule.observe(choice, 1, 0, 0.030 if choice.mode == "ssd" else 0.020, 1)  # SSD stays at 0.67x
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) >= 4
    assert gaps[1] > 1.5 * gaps[0] and gaps[2] > 1.5 * gaps[1]  # doubling
    assert gaps[-1] == gaps[-2]  # capped at max_backoff


class _FailsOnPrefill:
    """A drafter whose worker is lost at its `after`-th prefill (a resync after AR rounds, say)."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.prefills = inner, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, *args):
        self.prefills += 1
        if self.prefills >= self.after:
            from saguaro.ssd.client import WorkerError

            raise WorkerError("worker lost (test)")
        self.inner.prefill(*args)


@pytest.mark.parametrize("first", ["ar", "ssd"])
def test_a_worker_lost_while_auto_resyncs_finishes_on_the_local_draft_equal_to_ar(first):
    """The worker fails on the drafter's first prefill: a resync after AR rounds (the rows being prefilled
    are the running ones again: the local drafter must get each once), or the prefill of new rows."""
    from saguaro.ssd.protocol import LocalDrafter

    params = SamplingParams(temperature=0, max_tokens=24)
    target = tiny_model(3, VOCAB)
    draft = perturbed(target, 3, 0.05)
    k = 3

    def local():
        return LocalDrafter(SSDDrafter(draft, VOCAB, k, [0] * (k + 1)))

    for batch in (1, 3):
        ps = prompts(40 + batch, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        inner = local()
        engine = SSDEngine(target, _FailsOnPrefill(inner, 1), k, STOP, local_fallback=local,
                           policy=inner.fixed_policy(), round_rule=Alternating(first, period=2))
        got, _ = run(engine, ps, params)
        assert got == want and engine.degraded is not None


def test_a_mode_clock_weighs_rounds_by_their_tokens_and_leaves_stalls_out():
    """Speculative rounds yield 1 to K+1 tokens: most yield one and cost more than a plain step, the
    long ones pay for them. The clock is time over tokens (a median of per-round rates would call
    this mode slower than a plain step at 1.0 s a token), and a stalled round does not count."""
    from saguaro.engine.auto import ModeClock

    clock = ModeClock()
    for seconds, tokens in [(1.2, 1), (1.2, 1), (1.2, 1), (1.4, 3), (1.4, 3)] * 3:
        clock.add(seconds, tokens)
    assert clock.per_token_s == pytest.approx((1.2 * 3 + 1.4 * 2) / 9)  # 0.71 s a token
    clock.add(60.0, 1)  # stalled
    assert clock.per_token_s < 0.75


def test_a_near_tie_keeps_the_running_mode():
    """The other mode takes over only when it measures `switch_margin` faster (speculation from AR:
    `speculation_margin`): near a tie the noise of a busy machine would otherwise flip the mode back and
    forth, paying a settling round each time, and clocks timed apart must not talk the rule out of AR."""
    from saguaro.engine.auto import ModeClock

    rule = MeasuredRounds(speculative="sd", warmup=1, explore_every=10_000)

    def clock(per_token):
        c = ModeClock()
        c.add(per_token, 1)
        return c

    rule.clocks[("greedy", "sd")], rule.clocks[("greedy", "ar")] = clock(1.00), clock(1.02)
    assert rule(1, 0).mode == "sd"
    rule.clocks[("greedy", "ar")] = clock(0.99)  # 1% faster: noise
    assert rule(1, 0).mode == "sd"
    rule.clocks[("greedy", "ar")] = clock(0.90)
    assert rule(1, 0).mode == "ar"
    rule.clocks[("greedy", "sd")] = clock(0.89)  # and back to speculation only past its (wider) margin
    assert rule(1, 0).mode == "ar"
    rule.clocks[("greedy", "sd")] = clock(0.80)  # 1.12x: under speculation_margin
    assert rule(1, 0).mode == "ar"
    rule.clocks[("greedy", "sd")] = clock(0.70)  # 1.29x
    assert rule(1, 0).mode == "sd"


def test_a_band_with_a_prior_runs_it_until_the_other_mode_measures_clearly_faster():
    from saguaro.engine.auto import ModeClock

    def clock(per_token):
        c = ModeClock()
        c.add(per_token, 1)
        return c

    rule = MeasuredRounds(speculative="sd", warmup=1, explore_every=10_000, prior={"greedy": "sd", "sampled": "ar"})
    rule.clocks.update({("greedy", "sd"): clock(1.05), ("greedy", "ar"): clock(1.00),  # AR 5% faster: noise
                        ("sampled", "sd"): clock(0.97), ("sampled", "ar"): clock(1.00)})
    assert rule(1, 0).mode == "sd" and rule(1, 1).mode == "ar"
    rule.clocks[("greedy", "ar")] = clock(0.80)
    assert rule(1, 0).mode == "ar"
    rule.clocks[("sampled", "sd")] = clock(0.84)  # sampled SD 1.19x faster by its clock: AR holds the band
    assert rule(1, 1).mode == "ar"
    rule.clocks[("sampled", "sd")] = clock(0.78)  # 1.28x: past speculation_margin
    assert rule(1, 1).mode == "sd"


def test_a_band_with_a_prior_runs_it_first_and_times_the_other_mode_later():
    rule = MeasuredRounds(speculative="sd", warmup=2, explore_every=6, explore_tokens=2,
                          prior={"greedy": "sd", "sampled": "ar"})
    modes = []
    for _ in range(16):
        choice = rule(1, 1)  # a sampled row: AR by prior
        modes.append(choice.mode)
        rule.observe(choice, 1, 1, 0.020 if choice.mode == "sd" else 0.010, 1)  # SD at 0.5x
    # AR's warm-up (a settling round and 2 timed), 6 more rounds, then SD's warm-up, then AR again
    assert modes[:9] == ["ar"] * 9
    assert modes[9:12] == ["sd"] * 3
    assert modes[12:] == ["ar"] * 4
    assert rule.clocks[("sampled", "sd")].rounds == 2
    # the greedy band's prior is SD: it runs first there
    assert rule(1, 0).mode == "sd"


def test_paired_ratio_compares_runs_across_each_switch_over_equal_tokens():
    """AR's last 12 tokens against SD's block of 12 (3 rounds of 4), and the block against AR's first 12
    after it: drift between the stretches (AR at 10 ms a token, then 13) moves each pair's yardstick."""
    from saguaro.engine.mode_clocks import PairedRatio

    paired = PairedRatio("sd", cap=12, least=4)
    for _ in range(30):
        paired.add("ar", 0.010, 1)
    for _ in range(3):
        paired.add("sd", 0.030, 4)  # 7.5 ms a token: 0.75x AR's 10
    assert not paired.pairs  # the block is paired when it ends (or when the rule closes it)
    paired.close()
    assert list(paired.pairs) == [(pytest.approx(0.090), 12, pytest.approx(0.120), 12)]
    for _ in range(20):
        paired.add("ar", 0.013, 1)  # the machine slowed down: SD's block is 0.58x of this AR
    paired.add("sd", 0.030, 4)  # the next switch pairs the block with the AR after it
    assert len(paired.pairs) == 2 and paired.pairs[1][2] == pytest.approx(0.156)
    ratio, spread, pairs = paired.estimate()
    assert pairs == 2 and spread is None
    assert ratio == pytest.approx((0.090 / 0.010 + 0.090 / 0.013) / 24)


def test_a_stalled_round_stays_out_of_the_side_by_side_comparison():
    rule = MeasuredRounds(speculative="sd", warmup=4, explore_every=1000, explore_tokens=4)
    for seconds in [0.010] * 5 + [5.0] + [0.010] * 3:  # one AR round preempted for 5 s
        choice = RoundChoice("ar", "")
        rule.observe(choice, 1, 0, seconds, 1)
    for _ in range(5):
        rule.observe(RoundChoice("sd", ""), 1, 0, 0.016, 2)
    rule._pairs("greedy").close()
    (spec_s, spec_n, ar_s, ar_n), = rule.paired["greedy"].pairs
    assert ar_s / ar_n == pytest.approx(0.010) and spec_s / spec_n == pytest.approx(0.008)
