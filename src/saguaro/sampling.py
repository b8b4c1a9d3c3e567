"""Sampling parameters and the distribution every mode samples from (and verifies against)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Per-request decoding settings, as in vLLM. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    max_tokens: int = 16
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Turn logits [N, ..., V] (row i under params[i]) into the distribution to sample from.

    Greedy rows become one-hot on the argmax, so one verification rule serves both greedy and
    sampled rows. Temperature, then top-k, then top-p (nucleus), as in HF and vLLM.
    """
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    shape = logits.shape
    flat = logits.reshape(shape[0], -1, shape[-1])
    out = torch.empty_like(flat)
    for i, p in enumerate(params):
        row = flat[i]
        if p.greedy:
            out[i] = torch.zeros_like(row).scatter_(-1, row.argmax(-1, keepdim=True), 1.0)
            continue
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k, dim=-1).values[..., -1:]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        out[i] = probs
    return out.reshape(shape)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token is always kept
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs [N, V], each row drawing from its own generator.

    Uses the exponential race (argmax p/E with E ~ Exp(1)), which samples exactly from p and
    lets every row keep its own seeded stream.
    """
    if all(g is None for g in generators) and bool((probs.amax(-1) == 1.0).all()):
        return probs.argmax(-1)  # all rows one-hot (greedy): skip the noise
    noise = torch.empty_like(probs)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    return (probs / noise).argmax(-1)


def uniform(n: int, generators: list[torch.Generator | None], device="cpu") -> torch.Tensor:
    """One U[0, 1) draw per row, from each row's own generator."""
    return torch.cat([torch.rand(1, generator=g, device=device, dtype=torch.float64) for g in generators[:n]])
