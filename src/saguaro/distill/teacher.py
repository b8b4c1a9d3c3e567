"""Teacher data for distillation: the target's own continuations of train-split prompts, with its
top-k logits at every generated position, written once as safetensors shards and reused by training.

Training on the target's own outputs (not ShareGPT's human-written answers) is what the draft is
judged on: agreeing with this target's next token.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saguaro.models.transformer import CausalLM
from saguaro.prompts import load_prompts
from saguaro.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TOP_K = 16


def train_prompts(tokenizer: Tokenizer, datasets: list[str], seed: int, max_prompt_tokens: int) -> list[list[int]]:
    """Chat-formatted train-split prompts, shuffled deterministically by `seed`."""
    texts = [t for d in datasets for t in load_prompts(d, "train")]
    random.Random(seed).shuffle(texts)
    out = []
    for t in texts:
        ids = tokenizer.encode_chat([{"role": "user", "content": t}])
        if len(ids) <= max_prompt_tokens:
            out.append(ids)
    return out


@torch.inference_mode()
def generate_shard(target: CausalLM, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                   temperature: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Continue `prompts` with the target (greedy if temperature is 0); keep top-k logits per new token.

    Row i of the result holds prompt + continuation in `tokens`; `topk_ids/topk_logits[i, j]` is the
    target's prediction for token j + 1 (filled from the last prompt position on).
    """
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max()) + max_new_tokens
    tokens = torch.zeros(n, width, dtype=torch.int32)
    topk_ids = torch.zeros(n, width, TOP_K, dtype=torch.int32)
    topk_logits = torch.full((n, width, TOP_K), float("-inf"), dtype=torch.float16)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    cache = target.new_cache(n, width + 1)
    logits = target(tokens[:, : int(lengths.max())].long(), cache, logits_at=(lengths - 1)[:, None])[:, 0]
    cache.lengths[:] = lengths
    pos = lengths.clone()  # where each row's next token goes
    rows = torch.arange(n)  # rows still generating
    ends = torch.full((n,), width, dtype=torch.int32)  # tokens[i, :ends[i]] is the real text
    for _ in range(max_new_tokens):
        top = torch.topk(logits.float(), TOP_K, dim=-1)
        topk_ids[rows, pos - 1] = top.indices.int()
        topk_logits[rows, pos - 1] = top.values.half()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator)[:, 0]
        tokens[rows, pos] = nxt.int()
        pos += 1
        alive = torch.tensor([t not in stop_ids for t in nxt.tolist()]) & (pos < width)
        ends[rows[~alive]] = pos[~alive].int()
        if not alive.any():
            break
        if not alive.all():
            keep = alive.nonzero()[:, 0]
            rows, pos, nxt = rows[keep], pos[keep], nxt[keep]
            cache.select_rows(keep)
        logits = target(nxt[:, None], cache)[:, -1]
        cache.lengths += 1
    ends[rows] = pos.int()
    return {"tokens": tokens, "prompt_lengths": lengths.int(), "ends": ends,
            "topk_ids": topk_ids, "topk_logits": topk_logits}


def shard_paths(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("shard-*.safetensors"))


def write_shard(data_dir: Path, index: int, shard: dict[str, torch.Tensor],
                metadata: dict[str, str] | None = None) -> Path:
    """Written under a temporary name and renamed, so a shard file on disk is always complete."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"shard-{index:05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp), metadata=metadata)
    tmp.rename(path)
    return path


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
