"""Mode auto's clocks remembered across processes: a fresh engine on a known setup chooses at once."""

from __future__ import annotations

import pytest

from saguaro.engine import auto_memory
from saguaro.engine.auto import MeasuredRounds, RoundChoice


@pytest.fixture
def memory_on(monkeypatch):
    monkeypatch.setenv("SAGUARO_AUTO_MEMORY", "1")


def test_saved_clocks_come_back_per_setup(tmp_path, memory_on):
    a = auto_memory.setup_key(target="t.gguf:1:2", k=4)
    b = auto_memory.setup_key(target="t.gguf:1:2", k=3)
    assert a != b and a == auto_memory.setup_key(k=4, target="t.gguf:1:2")
    auto_memory.save(tmp_path, a, {"greedy/ssd": 0.01, "greedy/ar": 0.006})
    auto_memory.save(tmp_path, b, {"greedy/ssd": 0.02})
    assert auto_memory.load(tmp_path, a) == {"greedy/ssd": 0.01, "greedy/ar": 0.006}
    assert auto_memory.load(tmp_path, b) == {"greedy/ssd": 0.02}
    assert auto_memory.load(tmp_path, "unknown") == {}


def test_a_broken_or_disabled_memory_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGUARO_AUTO_MEMORY", "1")
    (tmp_path / auto_memory.FILE).write_text("{not json")
    assert auto_memory.load(tmp_path, "k") == {}
    auto_memory.save(tmp_path, "k", {"greedy/ar": 0.5})  # overwrites the broken file
    assert auto_memory.load(tmp_path, "k") == {"greedy/ar": 0.5}
    monkeypatch.setenv("SAGUARO_AUTO_MEMORY", "0")
    assert auto_memory.load(tmp_path, "k") == {}


def test_a_rule_that_recalls_both_modes_chooses_at_once_then_its_own_rounds_take_over():
    fresh = MeasuredRounds(warmup=1)
    assert "measuring" in fresh(1, 0).reason  # without memory: a timed round of each mode first

    rule = MeasuredRounds(warmup=1, explore_every=1000)
    rule.recall({"greedy/ssd": 0.010, "greedy/ar": 0.006, "bogus/ar": 1.0, "greedy/nope": 1.0})
    first = rule(1, 0)
    assert first.mode == "ar" and "measured faster" in first.reason
    assert "measuring" in rule(1, 1).reason  # the sampled band was not remembered
    for _ in range(9):  # this process finds AR slower than remembered: its window replaces the memory
        rule.observe(RoundChoice("ar", ""), 1, 0, 0.05, 1)
    rule.observe(RoundChoice("ssd", ""), 1, 0, 0.01, 1)
    rule.observe(RoundChoice("ssd", ""), 1, 0, 0.01, 1)
    assert rule(1, 0).mode == "ssd"
    assert set(rule.remembered()) == {"greedy/ssd", "greedy/ar"}
    assert rule.remembered()["greedy/ar"] == pytest.approx(0.05)


def sampled_rounds(rule: MeasuredRounds, rounds: int, sd_s: float, ar_s: float) -> list[str]:
    """The modes `rule` runs for one sampled row over `rounds` rounds of one token each, every SD round
    taking sd_s seconds and every AR round ar_s."""
    modes = []
    for _ in range(rounds):
        choice = rule(1, 1)
        modes.append(choice.mode)
        rule.observe(choice, 1, 1, sd_s if choice.mode == "sd" else ar_s, 1)
    return modes


def test_speculation_remembered_as_the_slower_is_not_re_timed_at_once():
    """Where the memory has speculation the slower (sampled SD at 7.5 ms a token, AR at 6.0), AR runs and
    SD waits the usual stretch (64 x 1.25^2 = 100 rounds) before it is re-timed: a fresh server's first
    96-token request does not pay for it. AR remembered as the slower is checked sooner (below)."""
    rule = MeasuredRounds(warmup=16, explore_every=64, explore_tokens=8, speculative="sd")
    rule.recall({"sampled/sd": 0.0075, "sampled/ar": 0.0060})
    modes = sampled_rounds(rule, 120, sd_s=0.0075, ar_s=0.0060)
    assert modes[:96] == ["ar"] * 96
    assert "sd" in modes[96:]  # but it is re-timed in time


def test_a_wrong_memory_is_checked_soon_and_replaced_by_one_re_measurement():
    """A memory that makes AR look far slower than it runs (sampled AR remembered at 9.3 ms a token,
    measured at 5.1) must not hold for hundreds of rounds: the remembered loser is re-measured after
    `explore_every` rounds, and one re-measurement's timed rounds replace it."""
    rule = MeasuredRounds(warmup=16, explore_every=64, explore_tokens=8, speculative="sd")
    rule.recall({"sampled/sd": 0.0050, "sampled/ar": 0.0093})
    modes = sampled_rounds(rule, 120, sd_s=0.0056, ar_s=0.0051)  # SD really the slower
    assert modes[0] == "sd" and "ar" in modes[60:75]  # the memory's choice first, AR re-timed within ~64
    assert modes[80:] == ["ar"] * 40  # then AR, which measured 9% faster
    assert rule.remembered()["sampled/ar"] == pytest.approx(0.0051)
