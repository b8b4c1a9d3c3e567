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
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], dtype=flat.dtype,
                         device=logits.device)
    scaled = flat / temps[:, None, None]
    top_k = [p.top_k if 0 < p.top_k < shape[-1] else 0 for p in params]
    if any(top_k):
        k = torch.tensor([t or shape[-1] for t in top_k], device=logits.device)
        kth = scaled.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None, None].expand(-1, flat.shape[1], 1))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, -1)
    top_p = torch.tensor([p.top_p for p in params], dtype=flat.dtype, device=logits.device)
    if bool((top_p < 1).any()):
        probs = _top_p(probs, top_p[:, None, None])
    if bool(greedy.any()):
        one_hot = torch.zeros_like(flat).scatter_(-1, flat.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None, None], one_hot, probs)
    return probs.reshape(shape)


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token is always kept
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    kept = torch.where(top_p >= 1, probs, kept)  # rows without a nucleus cut stay as they were
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs [N, V], each row drawing from its own generator.

    Uses the exponential race (argmax p/E with E ~ Exp(1)), which samples exactly from p and
    lets every row keep its own seeded stream. One-hot rows (greedy) draw no noise at all.
    """
    out = probs.argmax(-1)
    random_rows = (probs.amax(-1) < 1.0).nonzero()[:, 0].tolist()
    unseeded = [i for i in random_rows if generators[i] is None]
    if unseeded:
        rows = torch.tensor(unseeded, device=probs.device)
        p = probs[rows]
        out[rows] = (p / torch.empty_like(p).exponential_()).argmax(-1)
    for i in random_rows:
        if generators[i] is not None:  # seeded streams are CPU generators: the same draws on every device
            noise = torch.empty(probs.shape[-1], dtype=probs.dtype).exponential_(generator=generators[i])
            out[i] = (probs[i] / noise.to(probs.device)).argmax(-1)
    return out


def uniform(n: int, generators: list[torch.Generator | None], device="cpu") -> torch.Tensor:
    """[len(generators), n] draws from U[0, 1), row i from generators[i]."""
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in generators]).to(device)
