"""SSD with a real draft worker process on the embedded target: exact, and robust to worker faults."""

import os
import signal

import pytest
import torch

from saguaro.distill.draft import build_draft, save_draft
from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams

PROMPTS = ["def is_prime(n):", "List three colors of the rainbow:", "Hello! How are you today?", "x = [1, 2, 3]\n"]


@pytest.fixture(scope="module")
def draft_dir(embedded, tmp_path_factory):
    """A small (untrained) draft saved like a distilled one: acceptance is irrelevant to exactness."""
    _, target, _ = embedded
    path = tmp_path_factory.mktemp("draft")
    save_draft(build_draft(target, [0, 1], list(range(4096))), path, dtype=torch.float32)
    return path


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
