"""The peers in `saguaro bench`: HF transformers `generate` (mode `hf`) and its assisted generation
with our draft as the assistant (mode `hf-assisted`), on the same target, prompts and settings.

The target is the very checkpoint our engine loads (`resolve_checkpoint`: a GGUF becomes the cached
HF directory), in float32. Decoding matches ours: greedy or plain temperature sampling (top-k and
top-p off), `max_new_tokens` = max_tokens, and generation stops at any of our stop tokens, which
stay in the output as they do in ours.

The assistant. Our draft is a 2-layer Llama whose checkpoint lacks the embedding matrix (it uses
the target's) and whose output head covers only the 8192 ids in `saguaro_output_token_ids`, so
transformers cannot load it as it is. We build it in memory as a `LlamaForCausalLM` of the full
vocabulary: the target's embedding matrix is copied in, and `lm_head` is replaced by
`ReducedHead`, which computes the 8192 head logits and scatters them into a full-vocabulary row
filled with -inf. Expanding the head with zero rows instead would be wrong: a zero row gives
logit 0, which beats the head's logits whenever they are all negative (greedy would draft tokens
our draft never proposes) and takes probability mass when sampling; Llama has no lm_head bias to
push those rows down. With -inf the assistant's distribution is exactly our draft's q (zero outside
the head), so greedy assisted output equals plain greedy output, and sampled output is exact.

Assisted generation runs one prompt at a time (transformers supports batch size 1 only), drafting
a constant K tokens per round (`num_assistant_tokens` = K, schedule "constant", no confidence cut),
the same lookahead as our SD.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from saguaro.loader import read_safetensors, resolve_checkpoint
from saguaro.sampling import SamplingParams

log = logging.getLogger(__name__)

SAGUARO_CONFIG_KEYS = ("saguaro_output_token_ids", "saguaro_embeddings_from_target")


class ReducedHead(nn.Module):
    """A draft head over some token ids, presented as logits over the whole vocabulary (-inf elsewhere)."""

    def __init__(self, weight: torch.Tensor, token_ids: list[int], vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        head = hidden @ self.weight.T
        full = head.new_full((*head.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.token_ids, head)


def load_hf_target(target_path) -> nn.Module:
    """The target as a transformers model, float32, from the same files our loader reads."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_checkpoint(target_path)), dtype=torch.float32).eval()


def draft_as_hf_assistant(draft_path, hf_target: nn.Module, k: int) -> nn.Module:
    """Our draft checkpoint as a transformers `LlamaForCausalLM` usable as `assistant_model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    draft_dir = resolve_checkpoint(draft_path)
    cfg = json.loads((Path(draft_dir) / "config.json").read_text())
    head_ids = cfg.get("saguaro_output_token_ids")
    for key in SAGUARO_CONFIG_KEYS:
        cfg.pop(key, None)
    if cfg.get("model_type") != "llama":
        raise ValueError(f"hf-assisted needs a Llama draft, got model_type {cfg.get('model_type')!r}")
    cfg["torch_dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    weights = {name: w.float() for name, w in read_safetensors(Path(draft_dir)).items()}
    head = weights.pop("lm_head.weight")
    if "model.embed_tokens.weight" not in weights:
        weights["model.embed_tokens.weight"] = hf_target.get_input_embeddings().weight.detach().clone()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"draft does not fit a Llama: missing {missing}, unexpected {unexpected}")
    if head_ids is not None:
        model.lm_head = ReducedHead(head, head_ids, cfg["vocab_size"])
    else:
        model.lm_head.weight.data.copy_(head)
    gen = model.generation_config
    gen.num_assistant_tokens = k
    gen.num_assistant_tokens_schedule = "constant"
    gen.assistant_confidence_threshold = 0.0
    return model.eval()


def cut_at_stop(ids: list[int], stop_ids: set[int], max_tokens: int) -> list[int]:
    """Our output rule: everything up to and including the first stop token, at most max_tokens."""
    out = []
    for t in ids[:max_tokens]:
        out.append(t)
        if t in stop_ids:
            break
    return out


class HFRunner:
    """Generates a batch of prompts with transformers; returns per-prompt output ids."""

    def __init__(self, model: nn.Module, stop_ids: set[int], assistant: nn.Module | None = None):
        self.model, self.assistant = model, assistant
        self.stop_ids = set(stop_ids)
        self.pad_id = min(self.stop_ids)

    def _kwargs(self, params: SamplingParams) -> dict:
        kw = dict(max_new_tokens=params.max_tokens, eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad_id)
        if params.greedy:
            return dict(kw, do_sample=False, temperature=None, top_k=None, top_p=None)
        return dict(kw, do_sample=True, temperature=params.temperature, top_k=0, top_p=1.0)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        if self.assistant is not None:  # transformers: assisted generation takes one prompt at a time
            return [self._generate([p], [sp])[0] for p, sp in zip(prompts, params)]
        return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generation wants
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        if params[0].seed is not None:
            torch.manual_seed(params[0].seed)
        extra = {"assistant_model": self.assistant} if self.assistant is not None else {}
        out = self.model.generate(input_ids=ids, attention_mask=mask, **self._kwargs(params[0]), **extra)
        return [cut_at_stop(row[width:].tolist(), self.stop_ids, sp.max_tokens) for row, sp in zip(out, params)]

    def close(self) -> None:
        pass
