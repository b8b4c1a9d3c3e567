"""The same exactness checks on CUDA (skipped without a GPU; `make gpu-check` runs them)."""

import pytest
import torch

from saguaro.engine.base import AREngine
from saguaro.engine.speculative import SDEngine
from saguaro.engine.speculators import NeuralSpeculator
from saguaro.engine.ssd import LocalDrafter, SSDEngine
from saguaro.sampling import SamplingParams
from saguaro.ssd.drafter import SSDDrafter
from saguaro.ssd.fanout import geometric_fanout
from tests.test_sd_exactness import STOP, VOCAB, prompts, run
from tests.tiny import perturbed, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_sd_and_ssd_equal_ar_on_cuda(k):
    params = SamplingParams(temperature=0, max_tokens=24)
    target = tiny_model(0, VOCAB).cuda()
    draft = perturbed(tiny_model(0, VOCAB), 0, 0.05).cuda()
    ps = prompts(k, 4)
    want, _ = run(AREngine(target, STOP), ps, params)
    got, _ = run(SDEngine(target, NeuralSpeculator(draft, VOCAB), k, STOP), ps, params)
    assert got == want
    drafter = SSDDrafter(draft, VOCAB, k, geometric_fanout(3 * (k + 1), k, 0.7, 0.6))
    got, seqs = run(SSDEngine(target, LocalDrafter(drafter), k, STOP), ps, params)
    assert got == want
    assert sum(s.stats.cache_hits for s in seqs) > 0


def test_seeded_sampling_is_the_same_on_cpu_and_cuda():
    params = SamplingParams(temperature=0.8, max_tokens=16, seed=7)
    cpu = tiny_model(1, VOCAB)
    gpu = tiny_model(1, VOCAB).cuda()
    ps = prompts(3, 2)
    assert run(AREngine(cpu, STOP), ps, params)[0] == run(AREngine(gpu, STOP), ps, params)[0]


@pytest.mark.slow
def test_worker_ssd_on_cuda_equals_ar(embedded):
    """The draft worker on its own GPU (nccl) or beside the target (gloo) when there is only one."""
    from saguaro import LLM

    llm = LLM(mode="ar", device="cuda")
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts_ = ["def is_prime(n):", "List three colors of the rainbow:"]
    want = [o.token_ids for o in llm.generate(prompts_, sp)]
    ssd = llm.make_engine("ssd", None, 3)
    try:
        assert ssd.degraded is None
        llm.engine = ssd
        assert [o.token_ids for o in llm.generate(prompts_, sp)] == want
    finally:
        ssd.close()
