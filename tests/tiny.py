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


def with_file_blocks(model: CausalLM, kernel_dir, fmt: str = "q4_1", head_fmt: str = "q8_0",
                     int8_activations: bool = False) -> CausalLM:
    """`model` in bfloat16 with every linear's weight quantized to a GGUF block format as llama.cpp
    writes them (gguf.quants; the output head in `head_fmt`, like a tied Q8_0 embedding): the dense
    weights become the blocks' values, and the linears multiply by the blocks themselves (with int8
    activations if asked)."""
    from gguf import GGMLQuantizationType, quants

    from saguaro.models.linear import Linear, use_file_blocks

    model = model.float()
    blocks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                kind = GGMLQuantizationType[(head_fmt if name == "lm_head" else fmt).upper()]
                raw = quants.quantize(module.weight.numpy(), kind)
                module.weight.copy_(torch.from_numpy(quants.dequantize(raw, kind)))
                blocks[name] = (kind.name.lower(), torch.from_numpy(raw))
    model = model.bfloat16()
    taken = use_file_blocks(model, blocks, kernel_dir, int8_activations=int8_activations)
    assert sorted(taken) == sorted(blocks), "the CPU kernels did not load"
    return model
