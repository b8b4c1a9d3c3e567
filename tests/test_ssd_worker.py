"""SSD with a real draft worker process on the embedded target: exact, and robust to worker faults."""

import os
import signal

import pytest

from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams

PROMPTS = ["def is_prime(n):", "List three colors of the rainbow:", "Hello! How are you today?", "x = [1, 2, 3]\n"]


@pytest.fixture(scope="module")
def llms(embedded, draft_dir):
    from saguaro import LLM

    ar = LLM(mode="ar")
    yield ar


def reference(ar, batch, max_tokens=24):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.token_ids for o in ar.generate(PROMPTS[:batch], sp)]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("lookup_min_match", [0, 1])
def test_worker_ssd_greedy_equals_ar(llms, draft_dir, batch, lookup_min_match):
    ssd = llms.make_engine("ssd", str(draft_dir), 3, worker_timeout=60, lookup_min_match=lookup_min_match)
    try:
        assert ssd.degraded is None
        seqs = [Sequence(llms.tokenizer.encode(p), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
                for p in PROMPTS[:batch]]
        ssd.run(seqs)
        assert [s.output_ids for s in seqs] == reference(llms, batch)
        assert sum(s.stats.cache_lookups for s in seqs) > 0 or lookup_min_match
        lookups = sum(s.stats.lookup_rounds for s in seqs)
        assert lookups > 0 if lookup_min_match else lookups == 0  # flagged across the wire
    finally:
        ssd.close()


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_worker_fault_mid_generation(llms, draft_dir, fault):
    ssd = llms.make_engine("ssd", str(draft_dir), 3, worker_timeout=20)
    assert ssd.degraded is None
    try:
        seqs = [Sequence(llms.tokenizer.encode(p), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
                for p in PROMPTS]
        for s in seqs:
            ssd.add(s)
        for _ in range(3):
            ssd.step()
        worker = ssd.drafter.process
        os.kill(worker.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        while ssd.has_work():
            ssd.step()
        assert ssd.degraded is not None
        assert [s.output_ids for s in seqs] == reference(llms, 4)
        assert worker.poll() is not None  # a hung worker is not left behind
    finally:
        ssd.close()


def test_worker_that_cannot_start(llms, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # the worker fails to load this draft and exits
    with pytest.raises(Exception):
        llms.make_engine("ssd", str(tmp_path), 3, worker_timeout=5)


def test_two_ssd_llms_in_one_process(llms, draft_dir):
    """Each engine has its own channel: both run SSD (no fallback), both equal AR, and closing the
    first leaves the second working."""
    from saguaro import LLM

    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = reference(llms, 2)
    first = LLM(mode="ssd", draft=str(draft_dir), k=3, worker_timeout=60, lookup_min_match=0)
    second = LLM(mode="ssd", draft=str(draft_dir), k=3, worker_timeout=60, lookup_min_match=0)
    try:
        for llm in (first, second, first):  # interleaved: neither disturbs the other
            outs = llm.generate(PROMPTS[:2], sp)
            assert [o.token_ids for o in outs] == want
            assert llm.engine.degraded is None and llm.engine.drafter.process.poll() is None
            assert all(o.metrics["mode"] == "ssd" and "degraded" not in o.metrics for o in outs)
            assert all("cache_hit_rate" in o.metrics for o in outs)  # the worker's tree was looked up
        worker = first.engine.drafter.process
        first.close()
        assert worker.wait(timeout=30) == 0  # a clean Shutdown
        outs = second.generate(PROMPTS[:2], sp)
        assert [o.token_ids for o in outs] == want
        assert second.engine.degraded is None and all(o.metrics["mode"] == "ssd" for o in outs)
    finally:
        first.close()
        second.close()


def test_worker_killed_at_startup(llms, draft_dir, monkeypatch):
    """The worker dies right after it is spawned: noticed at once (not at a rendezvous timeout), the
    request finishes on the local draft, equal to AR, and the metrics say the engine is degraded."""
    import subprocess
    import time
    import types

    from saguaro import LLM
    from saguaro.ssd import client

    def spawn_and_kill(cmd, **kwargs):
        process = subprocess.Popen(cmd, **kwargs)
        process.kill()
        return process

    monkeypatch.setattr(client, "subprocess", types.SimpleNamespace(Popen=spawn_and_kill,
                                                                    TimeoutExpired=subprocess.TimeoutExpired))
    want = reference(llms, 1)
    t0 = time.monotonic()
    llm = LLM(mode="ssd", draft=str(draft_dir), k=3)
    try:
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        elapsed = time.monotonic() - t0
    finally:
        llm.close()
    assert elapsed < 20, f"took {elapsed:.1f} s end to end"
    assert out.token_ids == want[0]
    assert out.metrics["mode"] == "ssd-degraded" and "exited" in out.metrics["degraded"]
    assert "exited" in llm.engine.degraded


def test_worker_timeout_flag_reaches_the_engine_options():
    from saguaro.cli import UsageError, build_parser, ssd_options
    from saguaro.ssd.client import WORKER_TIMEOUT_S

    parse = build_parser().parse_args
    assert ssd_options(parse(["generate", "--mode", "ssd", "--worker-timeout", "3.5", "x"])).worker_timeout == 3.5
    assert ssd_options(parse(["generate", "x"])).worker_timeout is None  # the client's default applies
    assert 5 <= WORKER_TIMEOUT_S <= 30
    with pytest.raises(UsageError, match="worker-timeout"):
        ssd_options(parse(["generate", "--worker-timeout", "0", "x"]))
