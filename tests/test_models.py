"""Our decoder against HF transformers, and the KV cache's contracts."""

import pytest
import torch

from saguaro.loader import CheckpointError, load_model
from saguaro.models.linear import Linear, native_bf16
from tests.conftest import tiny_hf_model


def test_logits_match_hf(tiny_checkpoint):
    arch, path = tiny_checkpoint
    hf = tiny_hf_model(arch)
    ours = load_model(path)
    ids = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(ids, ours.new_cache(3))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_incremental_decode_equals_full_forward(tiny_checkpoint):
    _, path = tiny_checkpoint
    model = load_model(path, dtype=torch.float64)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    full = model(ids, model.new_cache(2))
    cache = model.new_cache(2, capacity=4)  # also exercises growth
    parts = []
    for chunk in ids.split([5, 1, 4, 2], dim=1):
        parts.append(model(chunk, cache))
        cache.lengths += chunk.shape[1]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_rollback_then_rewrite(tiny_checkpoint):
    """After truncating, new tokens overwrite stale slots and the result equals a clean run."""
    _, path = tiny_checkpoint
    model = load_model(path, dtype=torch.float64)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(1)
    model(ids, cache)
    cache.lengths += 10
    cache.truncate(0, 6)
    other = torch.tensor([[5, 7, 9]])
    got = model(other, cache)
    clean = model(torch.cat([ids[:, :6], other], 1), model.new_cache(1))[:, 6:]
    torch.testing.assert_close(got, clean, rtol=1e-10, atol=1e-10)


def test_branches_share_prefix_through_mask(tiny_checkpoint):
    """Two branches written past a shared prefix, each masked to see the prefix and itself,
    give the same logits as running each branch on its own copy of the prefix."""
    _, path = tiny_checkpoint
    model = load_model(path, dtype=torch.float64)
    prefix = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(1)
    model(prefix, cache)
    cache.lengths += 8
    # branch A continues after token 8 (position 8); branch B replaces token 8 (position 7)
    tokens = torch.tensor([[11, 13]])
    positions = torch.tensor([[8, 7]])
    slots = torch.tensor([[8, 9]])
    mask = torch.zeros(1, 2, 10, dtype=torch.bool)
    mask[0, 0, :9] = True  # A: prefix + itself
    mask[0, 1, :7] = True  # B: first 7 prefix tokens
    mask[0, 1, 9] = True  # + itself
    got = model(tokens, cache, positions=positions, slots=slots, mask=mask)
    a = model(torch.cat([prefix, tokens[:, :1]], 1), model.new_cache(1))[:, -1]
    b = model(torch.cat([prefix[:, :7], tokens[:, 1:]], 1), model.new_cache(1))[:, -1]
    torch.testing.assert_close(got[0, 0], a[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[0, 1], b[0], rtol=1e-10, atol=1e-10)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF-but-not-really")
    with pytest.raises(CheckpointError, match="GGUF"):
        load_model(bad)


def test_gguf_conversions_are_keyed_by_content_and_pruned(tmp_path, monkeypatch):
    """A copy of the same GGUF elsewhere (a clean clone, a temporary directory) reuses its conversion,
    and old conversions do not pile up in the cache (each is a dense copy of the model)."""
    from saguaro import loader

    monkeypatch.setenv("SAGUARO_CACHE", str(tmp_path / "cache"))
    made = []

    def fake_convert(path, out):
        made.append(path)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(loader, "gguf_to_hf", fake_convert)
    files = []
    for i, content in enumerate([b"one", b"one", *(f"other{j}".encode() for j in range(loader.KEEP_CONVERSIONS + 1))]):
        f = tmp_path / f"copy{i}" / "model.gguf"
        f.parent.mkdir()
        f.write_bytes(content)
        files.append(f)
    first, second = loader.converted_gguf_dir(files[0]), loader.converted_gguf_dir(files[1])
    assert first == second and made == [files[0]]
    dirs = [loader.converted_gguf_dir(f) for f in files[2:]]
    assert len(set(dirs)) == len(dirs) and len(made) == 1 + len(dirs)
    kept = sorted((tmp_path / "cache" / "converted").iterdir())
    assert len(kept) == loader.KEEP_CONVERSIONS and not first.exists() and dirs[-1] in kept


def test_packed_linear_matches_nn_linear_and_follows_weight_updates():
    from saguaro.models.linear import Linear

    torch.manual_seed(0)
    layer = Linear(32, 48)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.allclose(layer(x), want, atol=1e-5)
        layer.weight.mul_(2.0)  # an optimizer step: the packed copy must not go stale
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    y = layer(x)  # with autograd: the plain path, gradients flow
    y.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.skipif(not native_bf16(), reason="bfloat16 takes the packed path only where the CPU has it natively")
def test_packed_bf16_one_row_equals_its_row_among_many():
    """A lone row and the same row among others give bitwise the same output (SD verifies K+1 rows
    where AR feeds one; a different summation order would make greedy outputs drift apart)."""
    torch.manual_seed(0)
    for k, n in [(576, 960), (1536, 576), (576, 3072)]:
        layer = Linear(k, n, bias=False).to(torch.bfloat16)
        x = torch.randn(9, k, dtype=torch.bfloat16)
        with torch.inference_mode():
            alone = layer(x[:1])
            for m in (2, 5, 9):
                assert torch.equal(layer(x[:m])[:1], alone), (k, n, m)


def test_kv_cache_join_keeps_each_row_and_length():
    from saguaro.kv_cache import KVCache

    caches = []
    for batch, capacity in ((2, 5), (1, 9), (3, 4)):
        c = KVCache(2, batch, 1, 4, capacity, torch.float32)  # layers, rows, heads, head dim, slots
        c.k.normal_(), c.v.normal_()
        c.lengths[:] = torch.arange(batch) + capacity // 2
        caches.append(c)
    joined = KVCache.join(caches)
    assert joined.batch == 6 and joined.capacity == 9
    row = 0
    for c in caches:
        assert torch.equal(joined.k[:, row: row + c.batch, :, : c.capacity], c.k)
        assert torch.equal(joined.v[:, row: row + c.batch, :, : c.capacity], c.v)
        assert not joined.k[:, row: row + c.batch, :, c.capacity:].any()
        row += c.batch
    assert joined.lengths.tolist() == [c for x in caches for c in x.lengths.tolist()]
    assert KVCache.join(caches[:1]) is caches[0]
