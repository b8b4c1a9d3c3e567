"""On-policy teacher text from the engine: the target as saguaro runs it continues train-split prompts.

The generating teacher (`teacher.py`) decodes with the training target and keeps its top-k logits at
every step, at 56 new tokens/s on one core in float32 (82 in bfloat16; batches of 32, embedded target,
AMD EPYC). Decoding is what the engine is built for: the same 32 prompts through `LLM(mode="ar",
threads=1)` (bfloat16 over the GGUF's blocks, compiled steps, continuous batching) made 248 tokens/s.
So the text comes from the engine, and teacher forcing re-scores it (`--corpus onpolicy --onpolicy-dir
<work>/teacher-text`), a prefill at ~470 tokens/s in bfloat16, which adds the top-k and the tail mass.

The shards hold what `forced.onpolicy_items` reads: tokens, prompt_lengths, ends.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from saguaro.distill.teacher import shard_paths, train_prompts, write_shard
from saguaro.sampling import SamplingParams

log = logging.getLogger(__name__)

# prompts and their sampling parameters -> each prompt's generated token ids
Generate = Callable[[list[list[int]], list[SamplingParams]], list[list[int]]]
SAMPLED_TEMPERATURE = 0.8  # as the generating teacher's sampled shards


def shard_temperature(seed: int, index: int, greedy_fraction: float) -> float:
    """Greedy or sampled, per shard, from (seed, index) alone: a resumed run draws the same."""
    return 0.0 if random.Random(f"{seed}:{index}").random() < greedy_fraction else SAMPLED_TEMPERATURE


def text_shard(prompts: list[list[int]], outputs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Prompt + continuation per row, right-padded with zeros; tokens[i, :ends[i]] is row i's text."""
    lengths = [len(p) + len(o) for p, o in zip(prompts, outputs)]
    tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.int32)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        tokens[i, : lengths[i]] = torch.tensor(p + o, dtype=torch.int32)
    return {"tokens": tokens, "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.int32),
            "ends": torch.tensor(lengths, dtype=torch.int32)}


def run_text_teacher(generate: Generate, tokenizer, out_dir: Path, datasets: list[str], seed: int,
                     shard_prompts: int = 64, max_new_tokens: int = 256, max_prompt_tokens: int = 256,
                     greedy_fraction: float = 0.6, max_shards: int | None = None) -> dict:
    """Write shards of `shard_prompts` continued prompts into `out_dir`, resuming after the last one there."""
    prompts = train_prompts(tokenizer, datasets, seed, max_prompt_tokens)
    total = len(prompts) // shard_prompts
    done = len(shard_paths(out_dir))
    stop = total if max_shards is None else min(total, done + max_shards)
    new_tokens, wall = 0, 0.0
    for index in tqdm(range(done, stop), desc="teacher text", initial=done, total=total):
        batch = prompts[index * shard_prompts : (index + 1) * shard_prompts]
        temperature = shard_temperature(seed, index, greedy_fraction)
        params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                 seed=seed * 1_000_003 + index * shard_prompts + i) for i in range(len(batch))]
        t0 = time.monotonic()
        outputs = generate(batch, params)
        seconds = time.monotonic() - t0
        n = sum(map(len, outputs))
        write_shard(out_dir, index, text_shard(batch, outputs),
                    metadata={"temperature": str(temperature), "new_tokens": str(n), "wall_s": f"{seconds:.1f}"})
        new_tokens, wall = new_tokens + n, wall + seconds
        log.info("text shard %d: %d new tokens at T=%.1f in %.0fs (%.0f tokens/s)", index, n, temperature,
                 seconds, n / max(seconds, 1e-9))
    return {"shards": stop - done, "new_tokens": new_tokens, "wall_s": round(wall, 1),
            "tokens_per_s": new_tokens / wall if wall else None}
