"""Saguaro part 2: sampling sigma_{F,C}, which steers the verifier's residual onto cached tokens.

The draft samples from q' = normalize(q with its top-F tokens multiplied by C). On a rejection the
target emits from max(0, p - q'), which now puts more mass on those top-F tokens: the ones the
speculation cache pre-drafted as outcome candidates. The verifier must use q' itself, so the output
stays exactly the target's distribution. C = 1 is plain sampling.
"""

from __future__ import annotations

import torch


def saguaro_distribution(q: torch.Tensor, top_f: int, c: float) -> torch.Tensor:
    """q' over the last dimension: the top-`top_f` entries of q scaled by c, renormalised."""
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"C must be in [0, 1], got {c}")
    if top_f <= 0 or c == 1.0:
        return q
    top = q.topk(min(top_f, q.shape[-1]), dim=-1).indices
    scale = torch.ones_like(q).scatter_(-1, top, c)
    scaled = q * scale
    mass = scaled.sum(-1, keepdim=True)
    # if q lives entirely on its top-F tokens and C = 0 nothing is left: keep q there
    return torch.where(mass > 0, scaled / mass.clamp_min(torch.finfo(q.dtype).tiny), q)


def residual_mass_on(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Share of the residual normalize(max(0, p - q)) that falls on `tokens` (indices, last dim)."""
    residual = (p - q).clamp_min(0)
    return residual.gather(-1, tokens).sum(-1) / residual.sum(-1).clamp_min(torch.finfo(p.dtype).tiny)
