"""Decoder building blocks: RMSNorm, rotary embeddings, attention over a slot-addressed KV cache, SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from saguaro.config import ModelConfig
from saguaro.kv_cache import KVCache
from saguaro.models.attention import causal_attention, write_and_attend
from saguaro.models.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama-3's piecewise rescaling of long wavelengths when configured.
    Computed on the CPU whatever the default device (under the loader's meta device, arithmetic
    would import torch._dynamo: a second of CPU); the module's `to` moves them."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "factors":  # GGUF stores Llama-3 rescaling as per-frequency divisors (rope_freqs)
        return inv_freq / torch.tensor(scaling["factors"], dtype=inv_freq.dtype, device="cpu")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by absolute position (so branches can sit at any position)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _table(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < length or self._cos.dtype != dtype:
            n = max(length, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            freqs = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq.float()
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cos, self._sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return self._cos, self._sin

    def forward(self, positions: torch.Tensor, max_position: int, dtype: torch.dtype):
        cos, sin = self._table(max_position + 1, dtype)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [B, 1, T, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o = Linear(q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_eps) if config.qk_norm else None

    def project(self, x, cos, sin):
        """x [B, T, hidden] -> q [B, H, T, D] and k, v [B, Hk, T, D], q and k rotated."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        return q, k, v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, cache: KVCache, slots, mask):
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is None:  # training: causal over the whole rows, or within packed sequences of lengths `mask`
            out = causal_attention(q, k, v, mask)
        else:
            # saguaro's C++ attention where it applies (a few queries: batched decoding, verification), as
            # in the compiled step; else the cache write and torch's attention
            out = write_and_attend(q, k, v, cache.k[self.layer_index], cache.v[self.layer_index], slots, mask)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, slots, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, slots, mask)
        return x + self.mlp(self.mlp_norm(x))
