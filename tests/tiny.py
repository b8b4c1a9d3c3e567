"""Tiny random models built directly (no disk), for fast exactness tests."""

from __future__ import annotations

import torch

from saguaro.config import ModelConfig
from saguaro.models.transformer import CausalLM


def tiny_config(vocab: int = 32, layers: int = 2, arch: str = "llama", head_dim: int = 8, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=layers,
                       num_heads=4, num_kv_heads=2, head_dim=head_dim, max_position=256, qk_norm=arch == "qwen3",
                       eos_token_ids=[], **kw)


def tiny_model(seed: int, vocab: int = 32, scale: float = 0.5, layers: int = 2, **kw) -> CausalLM:
    """A random model whose logits are spread enough that greedy decoding is not a string of ties."""
    torch.manual_seed(seed)
    model = CausalLM(tiny_config(vocab, layers, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, scale)
    return model.double().eval()


def perturbed(model: CausalLM, seed: int, noise: float) -> CausalLM:
    """A draft that mostly agrees with `model`: the same weights plus noise."""
    torch.manual_seed(seed)
    draft = CausalLM(model.config).double().eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn_like(p))
    return draft
