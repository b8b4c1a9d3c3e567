"""Weights kept in a GGUF file's own block formats (Q4_1, Q8_0) and multiplied by saguaro's kernels:
close to a float64 reference of the file's values, each row's result independent of the rows beside
it, and greedy SD / SSD token-identical to AR on them (eager and compiled); sampled SD follows the
target's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.speculative import SDEngine
from saguaro.engine.speculators import NeuralSpeculator, NgramSpeculator
from saguaro.models import cpu_kernels
from saguaro.models.compiled import compile_step
from saguaro.sampling import SamplingParams
from tests.test_sd_exactness import SMALL_VOCAB, STOP, VOCAB, chi2_pvalue, exact_joint, prompts, run, sd_samples
from tests.test_ssd_exactness import ssd_engine
from tests.tiny import perturbed, tiny_model, with_file_blocks

pytestmark = pytest.mark.skipif(not cpu_kernels.supported(), reason="needs AVX512_BF16")

FORMATS = ["q4_1", "q8_0"]
# activations: bfloat16 (block_linear.cpp), and int8 (int8_block_linear.cpp) where the CPU has VNNI
ACTIVATIONS = [False, pytest.param(True, id="int8", marks=pytest.mark.skipif(
    not cpu_kernels.int8_supported(), reason="int8 activations need AVX512_VNNI"))]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels")
    assert cpu_kernels.load(path), "the kernels did not build here"
    return path


def _blocks(fmt: str, n: int, k: int, seed: int) -> np.ndarray:
    """A random weight quantized the way llama.cpp writes it."""
    w = np.random.default_rng(seed).normal(0, 0.05, (n, k)).astype(np.float32)
    w[:, :32] += 0.2  # a block with an offset: Q4_1's minimum term matters
    return quants.quantize(w, GGMLQuantizationType[fmt.upper()])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(64, 32), (576, 576), (100, 1536), (12, 64)])
def test_block_linear_is_close_to_float64_and_row_invariant(kernel_dir, fmt, n, k):
    raw = _blocks(fmt, n, k, n + k)
    w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[fmt.upper()])).double()
    packed = cpu_kernels.pack_blocks(fmt, torch.from_numpy(raw))
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(k)).bfloat16()
    y = cpu_kernels.block_linear(fmt, x, packed, n)
    want = x.double() @ w.T
    assert y.dtype == torch.bfloat16 and y.shape == (20, n)
    assert ((y.double() - want).abs() / (want.abs() + want.abs().mean())).max() < 2 ** -7  # bf16 output rounding
    for rows in range(1, 21):  # passes of up to 8 rows, any split: the same bits
        for start in (0, 20 - rows):
            assert torch.equal(cpu_kernels.block_linear(fmt, x[start:start + rows], packed, n), y[start:start + rows])


def test_negative_control_a_misread_layout_is_caught(kernel_dir):
    """The reference check above would see a layout error: the same blocks with Q4_1's nibble halves
    swapped (a plausible packing bug) are far from the file's values."""
    raw = _blocks("q4_1", 64, 576, 0)
    blocks = raw.reshape(64, -1, 20).copy()
    blocks[:, :, 4:] = (blocks[:, :, 4:] >> 4) | (blocks[:, :, 4:] << 4)
    w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1)).double()
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    misread = cpu_kernels.pack_blocks("q4_1", torch.from_numpy(blocks.reshape(64, -1)))
    y = cpu_kernels.block_linear("q4_1", x, misread, 64)
    want = x.double() @ w.T
    assert ((y.double() - want).abs() / (want.abs() + want.abs().mean())).max() > 2 ** -4


def test_bad_blocks_give_a_clear_error(kernel_dir):
    with pytest.raises(RuntimeError, match="uint8"):
        cpu_kernels.pack_blocks("q4_1", torch.zeros(4, 21, dtype=torch.uint8))
    packed = cpu_kernels.pack_blocks("q4_1", torch.from_numpy(_blocks("q4_1", 64, 64, 0)))
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_kernels.block_linear("q4_1", torch.zeros(1, 96, dtype=torch.bfloat16), packed, 64)


def test_training_and_float32_use_the_dense_weight(kernel_dir):
    model = with_file_blocks(tiny_model(0, VOCAB), kernel_dir)
    layer = model.layers[0].mlp.down
    x = torch.randn(3, layer.in_features)
    assert torch.equal(layer.float()(x), torch.nn.functional.linear(x, layer.weight))  # .float() drops the blocks
    assert layer.block_weight is None


@pytest.mark.parametrize("int8", ACTIVATIONS)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sd_and_ssd_equal_ar_on_file_blocks(kernel_dir, batch, int8):
    params = SamplingParams(temperature=0, max_tokens=24)
    hits = 0
    for seed, k in ((0, 2), (1, 4)):
        target = with_file_blocks(tiny_model(seed, VOCAB), kernel_dir, int8_activations=int8)
        assert target.lm_head.block_format == ("q8_0_i8" if int8 else "q8_0")
        draft = perturbed(tiny_model(seed, VOCAB), seed, 0.05).bfloat16()
        ps = prompts(seed * 10 + k, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        assert run(SDEngine(target, NeuralSpeculator(draft, VOCAB), k, STOP), ps, params)[0] == want, (seed, k)
        assert run(SDEngine(target, NgramSpeculator(), k, STOP), ps, params)[0] == want, (seed, k)
        got, seqs = run(ssd_engine(target, draft, k, [2] * (k + 1)), ps, params)
        assert got == want, (seed, k)
        hits += sum(s.stats.cache_hits for s in seqs)
    assert hits > 0


@pytest.mark.parametrize("int8", ACTIVATIONS)
def test_greedy_sd_equals_ar_on_compiled_file_blocks(kernel_dir, tmp_path, int8):
    """The compiled 1- and 5-token steps call the block kernels (C shims); the libraries for one and
    two threads agree bitwise, and greedy SD on them equals AR."""
    target = with_file_blocks(tiny_model(3, VOCAB, head_dim=64, tie_embeddings=True), kernel_dir,
                              int8_activations=int8)
    target.compiled = compile_step(target, tmp_path, [(1, 1), (1, 2), (5, None)], progress=False)
    assert target.compiled is not None and target.compiled.shared_weights
    draft = perturbed(tiny_model(3, VOCAB, head_dim=64, tie_embeddings=True), 1, 0.05).bfloat16()
    params = SamplingParams(temperature=0, max_tokens=48)
    for p in ([5, 9, 17, 3, 22, 9, 17], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        outs = []
        for engine in (AREngine(target, set()), SDEngine(target, NeuralSpeculator(draft, VOCAB), 4, set())):
            seq = Sequence(p, params)
            engine.run([seq])
            outs.append(seq.output_ids)
        assert len(outs[0]) == 48 and outs[0] == outs[1]
    assert target.compiled.stats.compiled_calls > 0
    saved, runs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cache = target.new_cache(1, 64)
            target(torch.arange(40)[None] % VOCAB, cache)
            cache.lengths[:] = 40
            runs.append(target(torch.tensor([[7]]), cache))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("int8", ACTIVATIONS)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_sd_on_file_blocks_follows_target_distribution(kernel_dir, temperature, int8):
    target = with_file_blocks(tiny_model(11, SMALL_VOCAB, scale=0.6), kernel_dir, int8_activations=int8)
    draft = tiny_model(12, SMALL_VOCAB, scale=0.6).bfloat16()  # disagrees with the target
    prompt = [1, 4, 2, 1, 4]
    samples = sd_samples(target, NeuralSpeculator(draft, SMALL_VOCAB), prompt, temperature, k=2)
    joint = exact_joint(target, prompt, temperature)
    total = sum(joint.values())  # float32 probabilities: 1 to ~1e-7, which scipy's check would refuse
    assert chi2_pvalue(samples, {cell: p / total for cell, p in joint.items()}) > 0.01


def test_embedded_file_blocks_are_the_dense_weights(embedded):
    """read_blocks names the file's blocks after our modules (q/k/v and gate/up fused, q/k rows
    un-permuted for RoPE, the tied head from the Q8_0 embedding): dequantized, each equals the dense
    weight the loader made from the same file."""
    from saguaro.gguf_blocks import read_blocks

    path, target, _ = embedded
    blocks = read_blocks(path, tuple(cpu_kernels.BLOCK_FORMATS))
    modules = dict(target.named_modules())
    assert len(blocks) == 4 * target.config.num_layers + 1
    for name in ("layers.0.attn.qkv", "layers.7.mlp.gate_up", "layers.29.mlp.down", "lm_head"):
        fmt, raw = blocks[name]
        values = quants.dequantize(raw.numpy(), GGMLQuantizationType[fmt.upper()])
        assert torch.equal(torch.from_numpy(values), modules[name].weight), name


def test_embedded_greedy_sd_equals_ar_on_file_blocks(embedded, kernel_dir):
    from saguaro.gguf_blocks import read_blocks
    from saguaro.loader import load_model
    from saguaro.models.linear import use_file_blocks

    path, _, tokenizer = embedded
    target = load_model(path, dtype=torch.bfloat16)
    assert len(use_file_blocks(target, read_blocks(path, cpu_kernels.BLOCK_FORMATS), kernel_dir)) == 121
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ps = [tokenizer.encode(p) for p in ("def is_prime(n):", "List three colors of the rainbow:")]
    want, _ = run(AREngine(target, tokenizer.stop_token_ids), ps, params)
    got, seqs = run(SDEngine(target, NgramSpeculator(), 4, tokenizer.stop_token_ids), ps, params)
    assert got == want


def test_packed_blocks_on_huge_pages_keep_their_values(kernel_dir):
    """use_file_blocks moves every layer's packed blocks into one allocation advised onto 2 MB pages:
    same bytes, separate tensors, and the linears give the same bits."""
    tensors = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (100, 5000, 64)]
    moved = cpu_kernels.on_huge_pages(tensors)
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(tensors, moved))
    assert moved[0].data_ptr() % 64 == 0 and moved[1].data_ptr() - moved[0].data_ptr() == 128
    from saguaro.models.linear import use_file_blocks

    target = tiny_model(0, VOCAB).bfloat16()
    layer = target.layers[0].mlp.down
    raw = torch.from_numpy(_blocks("q4_1", layer.out_features, layer.in_features, 0))
    assert use_file_blocks(target, {"layers.0.mlp.down": ("q4_1", raw)}, kernel_dir) == ["layers.0.mlp.down"]
    fresh = cpu_kernels.pack_blocks("q4_1", raw)
    assert torch.equal(layer.block_weight, fresh) and layer.block_weight.data_ptr() != fresh.data_ptr()
    x = torch.randn(3, layer.in_features).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x), cpu_kernels.block_linear("q4_1", x, fresh, layer.out_features))


def test_dropping_the_dense_copy_keeps_the_outputs_and_refuses_other_uses(kernel_dir):
    from saguaro.models.linear import drop_dense_weights

    model = with_file_blocks(tiny_model(5, VOCAB, tie_embeddings=True), kernel_dir)
    cache = model.new_cache(1, 32)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    want = model(ids, cache)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dense = sum(m.weight.numel() for m in linears if m is not model.lm_head)
    assert drop_dense_weights(model) == 2 * dense  # bfloat16; the tied head keeps the embeddings
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.numel() > 0
    assert all(m.weight.numel() == 0 for m in linears if m is not model.lm_head)
    cache = model.new_cache(1, 32)
    assert torch.equal(model(ids, cache), want)
    layer = model.layers[0].mlp.down
    with pytest.raises(RuntimeError, match="keeps only the GGUF file's blocks"):
        layer(torch.randn(2, layer.in_features))  # float32: would need the dense weight
    with pytest.raises(RuntimeError, match="dense weights were dropped"):
        model.float()
