"""One decoder for the Llama-3 and Qwen3 families (they differ by q/k-norm, head_dim and RoPE scaling)."""

from __future__ import annotations

import torch
from torch import nn

from saguaro.config import ModelConfig
from saguaro.kv_cache import KVCache
from saguaro.models.layers import DecoderLayer, RMSNorm, RotaryEmbedding
from saguaro.models.linear import Linear


SPAN_BLOCK = 32


def _attention_span(needed: int) -> int:
    """Keys a query attends over (the rest masked), rounded up to a multiple of 32. torch's CPU
    attention sums over keys in blocks; with the span on a block boundary a query's output no longer
    depends on how many keys past it there are (measured bitwise in bfloat16), so AR's one query and
    SD's K+1 give the same numbers for the same token."""
    return -(-needed // SPAN_BLOCK) * SPAN_BLOCK


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.rotary = RotaryEmbedding(config)
        out_ids = config.output_token_ids
        self.lm_head = Linear(config.hidden_size, len(out_ids) if out_ids else config.vocab_size, bias=False)
        if config.tie_embeddings and not out_ids:
            self.lm_head.weight = self.embed.weight
        # The compiled small forwards (models/compiled.py), when attached; calls they cover go there.
        self.compiled = None
        # Target-vocabulary id of each output row; None means the head covers the whole vocabulary.
        self.register_buffer(
            "output_token_ids", torch.tensor(out_ids, dtype=torch.long) if out_ids else None, persistent=False
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim, capacity, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        return_hidden: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ):
        """Run `input_ids` [B, T] against `cache` and return logits [B, T', V_out].

        positions: RoPE position of each token (default: right after each row's committed length).
        slots: cache slot each token's K/V goes to (default: its position).
        mask: [B, T, S] bool, which slots each token may attend to (default: causal by position).
        logits_at: [B, n] indices into T whose logits are wanted (the head is the costly matmul).
        inputs_embeds: [B, T, H] the first layer's inputs in place of the token embeddings.
        return_hidden: also return the final-norm hidden states at the `logits_at` positions.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = cache.lengths[:, None] + torch.arange(t, device=input_ids.device)
        if slots is None:
            slots = positions
        span = _attention_span(int(slots.max()) + 1) if mask is None else mask.shape[-1]
        cache.ensure_capacity(span)
        if mask is None:
            mask = torch.arange(span, device=input_ids.device) <= positions[:, :, None]
        cos, sin = self.rotary(positions, int(positions.max()), self.dtype)
        mask = mask[:, None]  # broadcast over heads
        if self.compiled is not None and inputs_embeds is None and self.compiled.accepts(b, t):
            wanted = logits_at if logits_at is not None else torch.arange(t, device=input_ids.device).expand(b, t)
            logits, h = self.compiled(input_ids, cos, sin, slots, mask, wanted, cache.k, cache.v)
            return (logits, h) if return_hidden else logits
        h = self._trunk(self.embed(input_ids) if inputs_embeds is None else inputs_embeds, cos, sin, cache, slots,
                        mask)
        if logits_at is not None:
            h = torch.gather(h, 1, logits_at[:, :, None].expand(-1, -1, h.shape[-1]))
        h = self.norm(h)
        logits = self.logits_of(h)
        return (logits, h) if return_hidden else logits

    def logits_of(self, states: torch.Tensor) -> torch.Tensor:
        """The head over final-norm hidden states, as float32 logits."""
        logits = self.lm_head(states)
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def _trunk(self, h, cos, sin, cache, slots, mask):
        for layer in self.layers:
            h = layer(h, cos, sin, cache, slots, mask)
        return h

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The final-norm hidden state [B, T, H] of every token (what the head multiplies), appended to
        `cache` after each row's committed length; eager. A feature-conditioned draft reads these."""
        b, t = input_ids.shape
        positions = cache.lengths[:, None] + torch.arange(t, device=input_ids.device)
        span = _attention_span(int(positions.max()) + 1)
        cache.ensure_capacity(span)
        mask = (torch.arange(span, device=input_ids.device) <= positions[:, :, None])[:, None]
        cos, sin = self.rotary(positions, int(positions.max()), self.dtype)
        return self.norm(self._trunk(self.embed(input_ids), cos, sin, cache, positions, mask))

    def forward_train(self, input_ids: torch.Tensor, lengths: tuple[int, ...] | None = None,
                      wanted: torch.Tensor | None = None) -> torch.Tensor:
        """Logits with autograd and no cache: of every position of right-padded input_ids [B, T], or, with
        `lengths`, of sequences packed end to end in input_ids [1, N] (each causal on its own, positions
        from 0), only at the packed positions `wanted` [M] -> [M, V_out]. Packing skips the padding, and
        `wanted` the head where no loss is taken (in real distillation batches of 8 rows, 34% of the positions
        were padding and 53% of the rest unlabelled)."""
        b, t = input_ids.shape
        if lengths is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        else:
            if b != 1 or sum(lengths) != t:
                raise ValueError(f"packed input_ids must be [1, {sum(lengths)}], got {list(input_ids.shape)}")
            positions = torch.cat([torch.arange(n, device=input_ids.device) for n in lengths])[None]
        cos, sin = self.rotary(positions, int(positions.max()), self.dtype)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, None, None, lengths)
        if wanted is not None:
            h = h[0, wanted]
        return self.lm_head(self.norm(h))
