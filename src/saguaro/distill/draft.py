"""Building, saving and loading a small Llama-architecture draft for a given target.

The draft has the target's width, a few layers initialised from chosen target layers, and an
output head over only the most frequent tokens. Its input embeddings are the target's own
(borrowed at load time, so they are not stored twice); its config says so.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from saguaro.models.feature_draft import FEATURE_DRAFT_KEY, FEATURE_FUSE, FeatureDraft
from saguaro.models.transformer import CausalLM
from saguaro.prompts import _sharegpt_conversations, humaneval_prompts
from saguaro.tokenizer import Tokenizer

log = logging.getLogger(__name__)

EMBEDDINGS_KEY = "saguaro_embeddings_from_target"


def frequent_tokens(tokenizer: Tokenizer, size: int, conversations: int = 3000) -> list[int]:
    """The `size` most frequent token ids in ShareGPT train text and HumanEval train prompts, stop tokens first."""
    counts: collections.Counter[int] = collections.Counter()
    for i, conv in enumerate(_sharegpt_conversations()[:conversations]):
        if i % 100 == 0:  # held-out conversations (see prompts.py) stay unseen
            continue
        for turn in conv:
            counts.update(tokenizer.encode(turn.get("value", "")))
    for p in humaneval_prompts("train"):
        counts.update(tokenizer.encode(p))
    ids = sorted(tokenizer.stop_token_ids)
    for t, _ in counts.most_common():
        if len(ids) >= size:
            break
        if t not in tokenizer.stop_token_ids:
            ids.append(t)
    return ids


def build_draft(target: CausalLM, init_layers: list[int], output_ids: list[int]) -> CausalLM:
    """A draft of len(init_layers) layers copied from the target, head = target embedding rows."""
    config = replace(target.config, num_layers=len(init_layers), output_token_ids=list(output_ids),
                     tie_embeddings=False)
    draft = CausalLM(config).to(target.dtype)
    with torch.no_grad():
        for i, src in enumerate(init_layers):
            draft.layers[i].load_state_dict(target.layers[src].state_dict())
        draft.norm.weight.copy_(target.norm.weight)
        head_src = target.lm_head.weight
        draft.lm_head.weight.copy_(head_src[torch.tensor(output_ids)])
    share_embeddings(draft, target)
    return draft


def grow_draft(draft: CausalLM, target: CausalLM, sources: list[int]) -> CausalLM:
    """`draft` with one more layer on top per entry of `sources`, computing the same function as before.

    Each new layer starts from the target layer named in `sources`, with its two residual branches
    (attention output, MLP down) zeroed, so it adds nothing until training moves those weights: the grown
    draft starts at the trained one's acceptance and the extra depth can only be learned, not unlearned.
    """
    config = replace(draft.config, num_layers=draft.config.num_layers + len(sources))
    grown = CausalLM(config).to(draft.dtype)
    with torch.no_grad():
        for i, layer in enumerate(draft.layers):
            grown.layers[i].load_state_dict(layer.state_dict())
        for i, src in enumerate(sources, start=draft.config.num_layers):
            grown.layers[i].load_state_dict(target.layers[src].state_dict())
            grown.layers[i].attn.o.weight.zero_()
            grown.layers[i].mlp.down.weight.zero_()
        grown.norm.weight.copy_(draft.norm.weight)
        grown.lm_head.weight.copy_(draft.lm_head.weight)
    share_embeddings(grown, target)
    return grown


def share_embeddings(draft: CausalLM, target: CausalLM) -> None:
    draft.embed.weight = target.embed.weight  # borrowed, frozen


def save_draft(draft: CausalLM, out_dir: Path, extra: dict | None = None, dtype=torch.bfloat16) -> None:
    """Write config.json + model.safetensors (HF names, without the borrowed embeddings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = draft.config.to_hf()
    cfg[EMBEDDINGS_KEY] = True
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.update(extra or {})
    tensors = {"model.norm.weight": draft.norm.weight, "lm_head.weight": draft.lm_head.weight}
    if isinstance(draft, FeatureDraft):
        cfg[FEATURE_DRAFT_KEY] = True
        tensors[FEATURE_FUSE] = draft.fuse.weight
    c = draft.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i, layer in enumerate(draft.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.attn.qkv.weight.split([q, kv, kv])
        gate, up = layer.mlp.gate_up.weight.split(c.intermediate_size)
        tensors.update({
            p + "input_layernorm.weight": layer.attn_norm.weight,
            p + "post_attention_layernorm.weight": layer.mlp_norm.weight,
            p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.attn.o.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.mlp.down.weight,
        })
    tmp = out_dir / "model.safetensors.tmp"
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.rename(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    write_manifest(out_dir)


MANIFEST = "SHA256SUMS"


def file_digests(out_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out_dir / name).read_bytes()).hexdigest()
            for name in ("config.json", "model.safetensors")}


def write_manifest(out_dir: Path) -> None:
    """sha256sum-style digests, so a broken re-export of a shipped draft is caught (`sha256sum -c`)."""
    lines = [f"{digest}  {name}" for name, digest in file_digests(out_dir).items()]
    (out_dir / MANIFEST).write_text("\n".join(lines) + "\n")
