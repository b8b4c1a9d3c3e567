"""Attention over the KV cache whose result for a query does not depend on what else is computed with it.

Greedy speculative decoding is token-identical to plain decoding only if the target gives a token the
same logits whether it is decoded alone (one query) or verified among K+1 queries, and whether the
cache span around it ends 32 or 96 keys later. torch's CPU kernels do not promise that: measured on
an AMD EPYC (AVX-512), both `scaled_dot_product_attention` and an fp32 `matmul` formulation gave
bitwise-different rows for the same query in 1287 of 1573 (query count, span) variations, enough that
bfloat16 AR and SD parted on 2 of 8 prompts. Accumulating q.k and p.v in float64 and rounding back
made all 1573 identical: the products of float32 (or bfloat16) numbers are exact in float64, so the
summation order only moves bits far below float32's last one. The softmax itself is invariant as is
(extra masked keys add exact zeros).

`cached_attention` is also a torch custom op, so a compiled forward keeps the cache write and this
attention out of its graph (one graph for every cache length) and calls back into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saguaro.kv_cache import write_slots
from saguaro.models import cpu_kernels

# Query counts up to this use the invariant path (decode, verification, a few draft branches); longer
# calls are prefills, which every mode runs the same way, so they take torch's fast kernel.
INVARIANT_MAX_QUERIES = 16


def invariant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hk, S, D] (H a multiple of Hk), mask [B, 1, T, S] bool -> [B, H, T, D] in q's dtype."""
    b, h, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    group = h // hk
    work = torch.promote_types(q.dtype, torch.float32)  # softmax dtype: float32, or float64 for float64 models
    qg = q.reshape(b, hk, group * t, d).double()
    scores = torch.matmul(qg, k.double().transpose(-1, -2)).to(work).mul_(d ** -0.5)
    allowed = mask.expand(b, 1, t, s).reshape(b, 1, 1, t, s).expand(b, 1, group, t, s).reshape(b, 1, group * t, s)
    probs = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
    out = torch.matmul(probs.double(), v.double())
    return out.to(q.dtype).reshape(b, h, t, d)


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torch's kernel; half dtypes run in float32 on a CPU (its bf16 CPU kernel took 325 us for one
    query against 53 us in float32, AMD EPYC, 300 keys)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return sdpa(q.float(), k.float(), v.float(), mask).to(q.dtype)
    return sdpa(q, k, v, mask)


def inference_attention(q, k, v, mask):
    if q.shape[2] <= INVARIANT_MAX_QUERIES and q.device.type == "cpu":
        return invariant_attention(q, k, v, mask)
    return fast_attention(q, k, v, mask)


def _sdpa_gqa(q, k, v, mask, causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


def _sdpa_repeat(q, k, v, mask, causal=False):  # torch < 2.5 has no enable_gqa
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask, is_causal=causal
    )


try:
    _probe = torch.zeros(1, 2, 1, 4)
    _sdpa_gqa(_probe, _probe[:, :1], _probe[:, :1], None)
    sdpa = _sdpa_gqa
except TypeError:
    sdpa = _sdpa_repeat


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     lengths: tuple[int, ...] | None = None) -> torch.Tensor:
    """Training attention, causal: over q [B, H, T, D] whole, or, with `lengths`, within each of the
    sequences packed end to end along T (none sees another). Causal by flag, not by a mask: torch's
    flash kernel then skips the blocks the mask would hide (8 x 640 tokens, bfloat16 forward and
    backward, 1 thread: 0.32-0.34 s a layer against 0.41-0.46 with a tril mask, outputs equal)."""
    if lengths is None:
        return sdpa(q, k, v, None, causal=True)
    parts = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
    return torch.cat([sdpa(qs, ks, vs, None, causal=True) for qs, ks, vs in parts], 2)


def kernel_applies(q: torch.Tensor) -> bool:
    """Whether saguaro's C++ attention (models/csrc/attention.cpp) serves this call: a few queries, on
    a CPU where the kernels are loaded. It is order-free like `invariant_attention`, and faster."""
    return (cpu_kernels.loaded() and q.device.type == "cpu" and q.shape[2] <= INVARIANT_MAX_QUERIES
            and q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] in (64, 128))


def write_and_attend(q, k, v, k_cache, v_cache, slots, mask):
    """Store k, v ([B, Hk, T, D]) at `slots` [B, T] of one layer's cache ([B, Hk, C, D]) and attend
    q over its first mask.shape[-1] slots."""
    if kernel_applies(q) and k_cache.is_contiguous():
        return torch.ops.saguaro_cpu.cached_attention(q, k, v, k_cache[None], v_cache[None], 0, slots, mask)
    write_slots(k_cache, v_cache, slots, k, v)
    span = mask.shape[-1]
    return inference_attention(q, k_cache[:, :, :span], v_cache[:, :, :span], mask)


@torch.library.custom_op("saguaro::cached_attention", mutates_args=("k_cache", "v_cache"))
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, layer: int, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """write_and_attend on layer `layer` of whole caches [L, B, Hk, C, D]. The op takes the whole
    tensors, not a layer's view: AOTInductor handed a view's mutation to a copy (measured: the
    cache was left unwritten)."""
    return write_and_attend(q, k, v, k_cache[layer], v_cache[layer], slots, mask).contiguous()


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, layer, slots, mask):
    # contiguous like the real output: a compiled caller reads the result with these strides
    return q.new_empty(q.shape)
