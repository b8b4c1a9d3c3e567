"""The block linears with int8 activations (csrc/int8_block_linear.cpp): the formula they compute and row
invariance (greedy and sampled speculative decoding on them: tests/test_file_blocks.py, parametrized),
and the draft put on them (speculators/draft.on_cpu_kernels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.speculative import SDEngine
from saguaro.engine.speculators import NeuralSpeculator
from saguaro.models import cpu_kernels
from saguaro.models.compiled import compile_step
from saguaro.sampling import SamplingParams
from tests.test_file_blocks import _blocks
from tests.test_sd_exactness import SMALL_VOCAB, STOP, VOCAB, chi2_pvalue, exact_joint, prompts, run, sd_samples
from tests.test_ssd_exactness import ssd_engine
from tests.tiny import perturbed, tiny_model, with_file_blocks

pytestmark = pytest.mark.skipif(not cpu_kernels.int8_supported(), reason="needs AVX512_BF16 and AVX512_VNNI")

FORMATS = ["q4_1", "q8_0"]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels")
    assert cpu_kernels.load(path), "the kernels did not build here"
    return path


def int8_reference(fmt: str, raw: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """float64 of what the kernel computes: x quantized per block of 32 (scale max|x| / 127, round half
    to even), integer dot products with the blocks' q, times d and the scale (+ m * the exact sum of x)."""
    n = raw.shape[0]
    width = 20 if fmt == "q4_1" else 34
    blocks = raw.reshape(n, -1, width)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if fmt == "q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        q = np.concatenate([blocks[..., 4:] & 15, blocks[..., 4:] >> 4], -1).astype(np.float64)
    else:
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float64)
    xb = x.double().numpy().reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    scale = amax.astype(np.float32) / np.float32(127)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1).astype(np.float32), 0)
    xq = np.clip(np.rint((xb.astype(np.float32) * inverse.astype(np.float32)).astype(np.float64)), -127, 127)
    dots = np.einsum("mbk,nbk->mnb", xq, q) * d[None] * scale.astype(np.float64)[:, None, :, 0]
    if fmt == "q4_1":
        dots = dots + m[None] * xb.sum(-1)[:, None, :]
    return torch.from_numpy(dots.sum(-1))


def _close(y: torch.Tensor, want: torch.Tensor) -> float:
    return float(((y.double() - want).abs() / (want.abs() + want.abs().mean())).max())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(64, 32), (576, 576), (100, 1536), (12, 64)])
def test_int8_block_linear_computes_its_formula_and_is_row_invariant(kernel_dir, fmt, n, k):
    raw = _blocks(fmt, n, k, n + k)
    packed = cpu_kernels.pack_blocks(fmt + cpu_kernels.INT8, torch.from_numpy(raw))
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(k)).bfloat16()
    x[3] = 0  # an all-zero row: scale 0, no division by it
    y = cpu_kernels.block_linear(fmt + cpu_kernels.INT8, x, packed, n)
    assert y.dtype == torch.bfloat16 and y.shape == (20, n)
    assert _close(y, int8_reference(fmt, raw, x)) < 2 ** -7  # bf16 output rounding
    assert torch.all(y[3] == 0)
    for rows in range(1, 21):  # passes of up to 8 rows, any split: the same bits
        for start in (0, 20 - rows):
            got = cpu_kernels.block_linear(fmt + cpu_kernels.INT8, x[start:start + rows], packed, n)
            assert torch.equal(got, y[start:start + rows])


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_control_the_reference_sees_a_wrong_kernel(kernel_dir, fmt):
    """The check above would catch the two likeliest bugs: Q4_1's nibble halves swapped, Q8_0's
    shift to unsigned not taken back (weights read as q + 128)."""
    raw = _blocks(fmt, 64, 576, 0)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    wrong = raw.reshape(64, -1, 20 if fmt == "q4_1" else 34).copy()
    if fmt == "q4_1":
        wrong[:, :, 4:] = (wrong[:, :, 4:] >> 4) | (wrong[:, :, 4:] << 4)
    else:
        wrong[:, :, 2:] ^= 0x80
    packed = cpu_kernels.pack_blocks(fmt + cpu_kernels.INT8, torch.from_numpy(wrong.reshape(64, -1)))
    y = cpu_kernels.block_linear(fmt + cpu_kernels.INT8, x, packed, 64)
    assert _close(y, int8_reference(fmt, raw, x)) > 2 ** -4


def test_int8_activations_stay_near_the_bf16_path(kernel_dir):
    """Quantizing activations moves outputs by ~1% of their scale, not more (a bound, not exactness)."""
    raw = _blocks("q4_1", 576, 1536, 1)
    x = torch.randn(8, 1536, generator=torch.Generator().manual_seed(1)).bfloat16()
    w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1)).double()
    y = cpu_kernels.block_linear("q4_1_i8", x, cpu_kernels.pack_blocks("q4_1_i8", torch.from_numpy(raw)), 576)
    want = x.double() @ w.T
    assert (y.double() - want).abs().max() < 0.03 * want.abs().max()


def test_weights_file_int8_needs_a_gguf(tmp_path):
    from saguaro.gguf_blocks import use_file_weights

    model = tiny_model(0, VOCAB).bfloat16()
    with pytest.raises(ValueError, match="weights='file-int8' is not possible here: .* is not a .gguf file"):
        use_file_weights(model, tmp_path / "model.safetensors", "file-int8", tmp_path)


def test_a_draft_on_int8_blocks_keeps_sd_and_ssd_exact(kernel_dir, monkeypatch):
    """The draft's arithmetic is free (speculators/draft.on_cpu_kernels): on Q4_1 blocks with int8
    activations, greedy SD and SSD still equal AR, and sampled SD follows the target."""
    from saguaro.speculators.draft import DRAFT_BLOCKS_ENV, on_cpu_kernels

    params = SamplingParams(temperature=0, max_tokens=24)
    for seed, k in ((0, 3), (1, 4)):
        target = tiny_model(seed, VOCAB).bfloat16()
        draft = perturbed(tiny_model(seed, VOCAB), seed, 0.05).bfloat16()
        assert on_cpu_kernels(draft) == "q4_1_i8"
        assert draft.layers[0].mlp.down.block_format == "q4_1_i8" and draft.layers[0].mlp.down.dense_dropped
        ps = prompts(seed * 7 + k, 3)
        want, _ = run(AREngine(target, STOP), ps, params)
        assert run(SDEngine(target, NeuralSpeculator(draft, VOCAB), k, STOP), ps, params)[0] == want, (seed, k)
        assert run(ssd_engine(target, draft, k, [2] * (k + 1)), ps, params)[0] == want, (seed, k)
    target = tiny_model(11, SMALL_VOCAB, scale=0.6).bfloat16()
    draft = tiny_model(12, SMALL_VOCAB, scale=0.6).bfloat16()
    on_cpu_kernels(draft)
    prompt = [1, 4, 2, 1, 4]
    samples = sd_samples(target, NeuralSpeculator(draft, SMALL_VOCAB), prompt, 1.0, k=2)
    joint = exact_joint(target, prompt, 1.0)
    total = sum(joint.values())
    assert chi2_pvalue(samples, {cell: p / total for cell, p in joint.items()}) > 0.01
    monkeypatch.setenv(DRAFT_BLOCKS_ENV, "none")
    assert on_cpu_kernels(tiny_model(0, VOCAB).bfloat16()) == "dense"
    monkeypatch.setenv(DRAFT_BLOCKS_ENV, "q5_k")
    with pytest.raises(ValueError, match="SAGUARO_DRAFT_BLOCKS must be one of"):
        on_cpu_kernels(tiny_model(0, VOCAB).bfloat16())


def test_sd_with_a_compiled_draft_on_int8_blocks_equals_ar(kernel_dir, tmp_path):
    """SD compiles the draft's one- and two-token steps beside the target's: the same logits as eager,
    bitwise, and greedy SD still equals AR, with K proposals a round or fewer where the draft is unsure."""
    from saguaro.speculators.draft import on_cpu_kernels

    target = with_file_blocks(tiny_model(3, VOCAB, head_dim=64, tie_embeddings=True), kernel_dir)
    target.compiled = compile_step(target, tmp_path, [(1, None), (5, None)], progress=False)
    draft = perturbed(tiny_model(3, VOCAB, head_dim=64, tie_embeddings=True), 1, 0.05).bfloat16()
    assert on_cpu_kernels(draft) == "q4_1_i8"
    eager = perturbed(tiny_model(3, VOCAB, head_dim=64, tie_embeddings=True), 1, 0.05).bfloat16()
    on_cpu_kernels(eager)
    draft.compiled = compile_step(draft, tmp_path, [(1, None), (2, None)], progress=False)
    caches = [m.new_cache(1, 64) for m in (draft, eager)]
    ids = torch.arange(20)[None] % VOCAB
    for m, c in zip((draft, eager), caches):
        m(ids, c)
        c.lengths[:] = 20
    for t in range(8):
        x = torch.tensor([[t + 3]])
        assert torch.equal(draft(x, caches[0]), eager(x, caches[1]))
        for c in caches:
            c.lengths += 1
    pair, last = torch.tensor([[7, 11]]), torch.tensor([[1]])  # a round's start after a fully accepted one
    assert torch.equal(draft(pair, caches[0], logits_at=last), eager(pair, caches[1], logits_at=last))
    assert draft.compiled.stats.compiled_calls == 9
    params = SamplingParams(temperature=0, max_tokens=40)
    seqs = [Sequence([5, 9, 17, 3, 22, 9, 17], params) for _ in range(3)]
    AREngine(target, set()).run(seqs[:1])
    SDEngine(target, NeuralSpeculator(draft, VOCAB), 4, set()).run(seqs[1:2])
    SDEngine(target, NeuralSpeculator(draft, VOCAB, min_confidence=0.5), 4, set()).run(seqs[2:])
    assert seqs[0].output_ids == seqs[1].output_ids == seqs[2].output_ids and len(seqs[0].output_ids) == 40
