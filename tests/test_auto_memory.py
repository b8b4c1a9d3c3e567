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
