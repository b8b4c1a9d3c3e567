"""A draft that reads the target's hidden states (EAGLE-style): far more to go on than the tokens alone.

At position i the draft's input is the target's final-norm hidden state at i-1 and the embedding of token
i, fused by one linear layer; a few decoder layers and a norm turn that into its guess of the target's
hidden state at i, and its head into the next token's logits. Past the last verified token the draft has
no target state, so it feeds its own guess back: drafting step d at position n+d-1 reads the draft's
output at n+d-2.

Training unrolls those steps ("training-time test"): pass d runs every position as step d of a chain,
attending to pass-1 keys up to the chain's start and to its own chain's keys of passes 2..d, exactly
what the KV cache holds when the draft runs (see `chain_mask`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from saguaro.config import ModelConfig
from saguaro.models.attention import sdpa
from saguaro.models.linear import Linear
from saguaro.models.transformer import CausalLM

FEATURE_DRAFT_KEY = "saguaro_feature_draft"  # config.json: this checkpoint is a FeatureDraft
FEATURE_FUSE = "model.fuse.weight"  # its checkpoint name for the fuse layer


def chain_mask(t: int, depth: int, device=None) -> torch.Tensor:
    """[t, depth * t] bool: which keys (pass 1's, then pass 2's, ...) a pass-`depth` query at i sees.

    A pass-d query at i is step d of a chain that starts at n = i - d + 1: it sees pass-1 keys at
    j <= n (positions fed with the target's states) and, of each pass m = 2..d, the key at n + m - 1.
    """
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    blocks = [j <= i - (depth - 1)] + [j == i - (depth - 1) + m for m in range(1, depth)]
    return torch.cat(blocks, 1)


class FeatureDraft(CausalLM):
    """CausalLM whose token embedding is fused with the target's previous hidden state."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        h = config.hidden_size
        self.fuse = Linear(2 * h, h, bias=False)

    def inputs(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """features [B, T, H]: the hidden state (the target's, or the draft's own guess) at each token's
        previous position."""
        e = self.embed(input_ids)
        return self.fuse(torch.cat([features.to(e.dtype), e], -1))

    def draft_step(self, input_ids: torch.Tensor, features: torch.Tensor, cache, **kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """A cached forward (CausalLM.forward's keywords): logits and the draft's guesses of the target's
        states at the `logits_at` positions, which the next drafting step reads as its features."""
        return self(input_ids, cache, inputs_embeds=self.inputs(input_ids, features), return_hidden=True, **kwargs)

    def forward_chains(self, input_ids: torch.Tensor, features: torch.Tensor, depth: int,
                       heads: bool = True) -> list[torch.Tensor]:
        """Logits [B, T, V] of drafting steps 1..depth at every position, with autograd and no cache
        (heads=False: the guessed states [B, T, H] instead, for a caller that wants a few positions' logits).

        features[:, i] is the target's state at i-1 (row 0: zeros). Pass d's logits at i are step d of
        the chain drafted after position i - d + 1, its tokens the real ones (teacher forcing)."""
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        cos, sin = self.rotary(positions, t - 1, self.dtype)
        past: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
        out, feats = [], features
        for d in range(1, depth + 1):
            mask = chain_mask(t, d, input_ids.device)
            x = self.inputs(input_ids, feats)
            for layer, kv in zip(self.layers, past):
                x = _chain_layer(layer, x, cos, sin, kv, mask)
            guess = self.norm(x)
            out.append(self.lm_head(guess) if heads else guess)
            feats = torch.cat([torch.zeros_like(guess[:, :1]), guess[:, :-1]], 1)  # step d+1 reads step d's guess
        return out


def _chain_layer(layer, x, cos, sin, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor):
    """One decoder layer for one training pass; kv holds the earlier passes' keys and values (appended to)."""
    b, t, _ = x.shape
    q, k, v = layer.attn.project(layer.attn_norm(x), cos, sin)
    kv.append((k, v))
    keys = torch.cat([pk for pk, _ in kv], 2)
    values = torch.cat([pv for _, pv in kv], 2)
    attn = sdpa(q, keys, values, mask)
    x = x + layer.attn.o(attn.transpose(1, 2).reshape(b, t, -1))
    return x + layer.mlp(layer.mlp_norm(x))


def build_feature_draft(target: CausalLM, init_layers: list[int], output_ids: list[int]) -> FeatureDraft:
    """A fresh feature draft that starts by passing the target's previous state through: the fuse takes the
    state alone and the layers' residual branches are zero (their other weights copied from `init_layers`
    of the target), the norm and head rows are the target's. So it starts as the target's own distribution
    one position back (a first-batch loss of 7.4, where adding state and embedding, or a random init,
    gave 15), and a perfect guess of the state gives the target's logits."""
    config = replace(target.config, num_layers=len(init_layers), output_token_ids=list(output_ids),
                     tie_embeddings=False)
    draft = FeatureDraft(config).to(target.dtype)
    h = config.hidden_size
    with torch.no_grad():
        for i, src in enumerate(init_layers):
            draft.layers[i].load_state_dict(target.layers[src].state_dict())
        draft.norm.weight.copy_(target.norm.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight[torch.tensor(output_ids)])
        draft.fuse.weight.zero_()
        draft.fuse.weight[:, :h].copy_(torch.eye(h, dtype=draft.fuse.weight.dtype))
        for layer in draft.layers:
            layer.attn.o.weight.zero_()
            layer.mlp.down.weight.zero_()
    draft.embed.weight = target.embed.weight  # borrowed, frozen
    return draft
