"""Verification of a speculation: the rule that makes speculative decoding exact.

For each row: accept draft token s_i with probability min(1, p_i(s_i) / q_i(s_i)); at the first
rejection emit a token from normalize(max(0, p_i - q_i)); if all K are accepted emit a bonus token
from p_{K+1}. Greedy rows arrive with p one-hot on the target's argmax, which turns the same rule
into "accept while the draft matches the argmax, then emit the argmax".

q is whatever distribution the draft actually sampled from (a modified one under Saguaro
sampling, zero outside a draft's reduced vocabulary); q=None means deterministic proposals
(n-gram), i.e. q one-hot on the proposed token.

A row may propose fewer than K tokens (`lengths`: a draft that stops where it is unsure). Its
positions past its length are not proposals: after its last proposal the emitted token comes from p,
as a bonus does. This stays exact when whether position i is proposed depends only on the context
and the proposals before i (each position then emits from p either way); a rule that looked at the
token drawn at i itself, keeping it or not, would bias the output.
"""

from __future__ import annotations

import torch

from saguaro.sampling import sample, uniform


def verify(draft_tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor,
           generators: list[torch.Generator | None], lengths: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens [B, K], q [B, K, V] or None, p [B, K+1, V], lengths [B] (None: K each) ->
    (accepted [B], emitted token [B])."""
    b, k = draft_tokens.shape
    rows = torch.arange(b, device=p.device)
    p_draft = p[:, :k].gather(-1, draft_tokens[..., None])[..., 0]
    q_draft = torch.ones_like(p_draft) if q is None else q.gather(-1, draft_tokens[..., None])[..., 0]
    u = uniform(k, generators, p.device).to(p.dtype)
    accept = u * q_draft < p_draft  # u < p/q without dividing by q
    proposed = torch.full((b,), k, device=p.device) if lengths is None else lengths.to(p.device)
    accept &= torch.arange(k, device=p.device) < proposed[:, None]
    accepted = accept.int().cumprod(-1).sum(-1)  # length of the accepted prefix
    at = accepted.clamp(max=k - 1)
    rejected = accepted < proposed
    p_next = p[rows, accepted]  # p_{n+1}: the residual's p on rejection, the bonus distribution otherwise
    if q is None:
        q_next = torch.zeros_like(p_next).scatter_(-1, draft_tokens[rows, at][:, None], 1.0)
    else:
        q_next = q[rows, at]
    residual = (p_next - q_next).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    # p == q at a rejected position can only come from rounding; fall back to p there
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(p.dtype).tiny), p_next)
    dist = torch.where(rejected[:, None], residual, p_next)
    return accepted, sample(dist, generators)


def verify_greedy(draft_tokens: torch.Tensor, target_tokens: torch.Tensor, lengths: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify` for rows whose p is one-hot on the target's greedy token, given those tokens [B, K+1]:
    whatever q is, a draft is accepted exactly when it is the target's token (u * q(s) < 1 always
    holds, u * q(s) < 0 never), and the residual, or the bonus, is one-hot on the target's token at
    the first mismatch. No probabilities over the vocabulary are formed."""
    k = draft_tokens.shape[1]
    accepted = (draft_tokens == target_tokens[:, :k]).int().cumprod(-1).sum(-1)
    if lengths is not None:
        accepted = torch.minimum(accepted, lengths.to(accepted.device))
    return accepted, target_tokens.gather(1, accepted[:, None])[:, 0]
