"""The compiled decode/verify step: same logits as eager, greedy SD token-identical to AR on it, built
once and then loaded from the on-disk cache, and an eager fallback when it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.speculative import SDEngine
from saguaro.engine.speculators import NeuralSpeculator
from saguaro.models import compiled as compiled_mod
from saguaro.models.attention import invariant_attention
from saguaro.models.compiled import compile_step
from saguaro.models.linear import native_bf16
from saguaro.sampling import SamplingParams
from tests.tiny import perturbed, tiny_model

VOCAB = 64
DTYPES = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])


def _model(dtype: torch.dtype):
    # head_dim 64: saguaro's C++ attention serves it where the CPU kernels load
    return tiny_model(3, VOCAB, layers=2, head_dim=64, tie_embeddings=True).to(dtype)  # tied: one tensor, two names


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def compiled_model(request, tmp_path_factory):
    """A tiny model with its compiled 1- and 5-token steps, and the cache directory they live in."""
    model = _model(request.param)
    cache_dir = tmp_path_factory.mktemp("compiled")
    step = compile_step(model, cache_dir, [(1, None), (5, None)], progress=False)
    assert step is not None, "AOTInductor could not build the step on this machine"
    model.compiled = step
    return model, cache_dir


def _logits(model, ids, cache, use_compiled):
    saved = model.compiled
    model.compiled = saved if use_compiled else None
    try:
        return model(ids, cache)
    finally:
        model.compiled = saved


def test_compiled_matches_eager(compiled_model):
    model, _ = compiled_model
    tol = 1e-4 if model.dtype == torch.float32 else 0.1
    prompt = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    for tokens in (1, 5):
        caches = [model.new_cache(1, 64) for _ in range(2)]
        for cache in caches:
            model(prompt, cache)  # eager prefill (40 rows)
            cache.lengths[:] = 40
        ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        before = model.compiled.stats.compiled_calls
        got = _logits(model, ids, caches[0], True)
        want = _logits(model, ids, caches[1], False)
        assert model.compiled.stats.compiled_calls == before + 1
        assert got.shape == want.shape == (1, tokens, VOCAB)
        assert (got - want).abs().max() < tol
        # the compiled call wrote the new tokens' keys and values into the cache, as the eager one does
        written = slice(40, 40 + tokens)
        for got_kv, want_kv in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
            assert got_kv[:, :, :, written].abs().sum() > 0
            assert (got_kv[:, :, :, written].float() - want_kv[:, :, :, written].float()).abs().max() < tol


def test_libraries_are_called_with_flat_tensors_and_give_the_packages_outputs(compiled_model):
    """flat_call skips the package's per-call pytree work; it must be taken here, and agree with it."""
    model, cache_dir = compiled_model
    path = next(cache_dir.glob("*-t1-*.pt2"))
    package = torch._inductor.aoti_load_package(str(path))
    fast = compiled_mod.flat_call(package, inputs=8)
    assert fast is not package
    assert compiled_mod.flat_call(package, inputs=7) is package  # another input spec: the package's own call
    cache = model.new_cache(1, 64)
    model(torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3)), cache)
    cache.lengths[:] = 40
    captured = []
    real = model.compiled._runners[1, torch.get_num_threads()]
    model.compiled._runners[1, torch.get_num_threads()] = lambda *args: captured.append(args) or real(*args)
    try:
        model(torch.tensor([[5]]), cache)
    finally:
        model.compiled._runners[1, torch.get_num_threads()] = real
    (args,) = captured
    if model.compiled.shared_weights:
        package.load_constants(model.compiled._constants(package.get_constant_fqns()), check_full_update=True,
                               user_managed=True)
    # the same library run twice on the same inputs writes the same cache slot: outputs must match
    for got, want in zip(fast(*args), package(*args)):
        assert torch.equal(got, want)


def test_greedy_sd_equals_ar_on_compiled_step(compiled_model):
    model, _ = compiled_model
    draft = perturbed(_model(torch.float64), 1, 0.05).to(model.dtype)
    params = SamplingParams(temperature=0, max_tokens=64)
    prompts = [[5, 9, 17, 3, 22, 9, 17], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    for p in prompts:
        outs = []
        for engine in (AREngine(model, set()), SDEngine(model, NeuralSpeculator(draft, VOCAB), 4, set())):
            seq = Sequence(p, params)
            engine.run([seq])
            outs.append(seq.output_ids)
        assert len(outs[0]) == 64
        assert outs[0] == outs[1]


def test_generation_never_recompiles_and_second_start_loads(compiled_model, monkeypatch):
    """A 64-token generation calls the built library at every decode step and never compiles; a
    second start loads the libraries and builds nothing."""
    model, cache_dir = compiled_model
    built = []
    monkeypatch.setattr(compiled_mod, "_build", lambda *a: built.append(a))
    again = compile_step(model, cache_dir, [(1, None), (5, None)], progress=False)
    assert again is not None and built == [] and again.stats.build_s == 0.0
    assert len(again.paths) == 2 and again.stats.load_s > 0
    assert not again.accepts(1, 3) and not again.accepts(2, 1)  # no library: eager
    calls = model.compiled.stats.compiled_calls
    seq = Sequence([4, 8, 15, 16, 23, 42], SamplingParams(temperature=0, max_tokens=64))
    AREngine(model, set()).run([seq])
    assert model.compiled.stats.compiled_calls - calls == 63  # every decode step after the prefill
    assert built == []


def test_build_failure_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiled_mod, "_build", broken)
    with caplog.at_level(logging.WARNING):
        assert compile_step(_model(torch.float32), tmp_path, [(1, None)], progress=False) is None
    assert "running eager" in caplog.text and "no C++ compiler here" in caplog.text


def test_invariant_attention_is_invariant_to_query_count_and_span():
    """The same query gives bitwise the same output alone or among others, whatever the span."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 400, 16, generator=g), torch.randn(1, 2, 400, 16, generator=g)
    q = torch.randn(1, 4, 8, 16, generator=g)
    mismatches = 0
    for p in range(1, 300, 13):
        ref = None
        for t in (1, 3, 5, 8):
            for extra in (0, 32, 64):
                span = -(-(p + t) // 32) * 32 + extra
                mask = (torch.arange(span)[None] <= (p + torch.arange(t))[:, None])[None, None]
                out = invariant_attention(q[:, :, :t], k[:, :, :span], v[:, :, :span], mask)[:, :, 0]
                ref = out if ref is None else ref
                mismatches += int(not torch.equal(out, ref))
    assert mismatches == 0


def test_prune_keeps_the_most_recently_used_libraries(tmp_path):
    import os
    import time as _time

    now = _time.time()
    for i in range(5):
        path = tmp_path / f"lib{i}.pt2"
        path.write_bytes(b"x")
        os.utime(path, (now - 100 * i, now - 100 * i))  # lib0 newest, lib4 oldest
    removed = compiled_mod.prune(tmp_path, keep=3)
    assert sorted(p.name for p in removed) == ["lib3.pt2", "lib4.pt2"]
    assert sorted(p.name for p in tmp_path.glob("*.pt2")) == ["lib0.pt2", "lib1.pt2", "lib2.pt2"]
    (tmp_path / "lib1.pt2").write_bytes(b"x" * 10)  # now the newest, and over a byte budget alone
    removed = compiled_mod.prune(tmp_path, keep=3, keep_bytes=5)
    assert sorted(p.name for p in removed) == ["lib0.pt2", "lib2.pt2"]  # the newest stays whatever its size


def test_kernel_path_is_thread_count_invariant(tmp_path):
    """bfloat16 on saguaro's CPU kernels: the libraries for one and for two threads give a token bitwise
    the same logits, so auto's AR rounds (every core) and SSD rounds (the target's share) agree."""
    if not native_bf16():
        pytest.skip("needs native bfloat16")
    model = _model(torch.bfloat16)
    model.compiled = compile_step(model, tmp_path, [(1, 1), (1, 2)], progress=False)
    assert model.compiled is not None and model.compiled.shared_weights
    prompt = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    saved = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cache = model.new_cache(1, 64)
            model(prompt, cache)
            cache.lengths[:] = 40
            steps = []
            for i in range(ids.shape[1]):
                steps.append(model(ids[:, i:i + 1], cache))
                cache.lengths += 1
            runs.append(torch.cat(steps, 1))
    finally:
        torch.set_num_threads(saved)
    assert model.compiled.stats.compiled_calls == 2 * ids.shape[1]
    assert torch.equal(runs[0], runs[1])
