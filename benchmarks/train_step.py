"""One distillation training step of the shipped draft, float32 against bfloat16 autocast, side by side.

    python benchmarks/train_step.py [--threads 1] [--rows 8] [--length 400] [--repeats 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saguaro.embedded import embedded_draft_path, embedded_target_path
from saguaro.loader import load_model


def step_seconds(draft, opt, tokens: torch.Tensor, bf16: bool) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = draft.forward_train(tokens)
    loss = logits.float().logsumexp(-1).mean()  # any loss over every logit costs the same backward
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load_model(embedded_target_path())
    draft = load_model(embedded_draft_path(), embeddings_from=target)
    draft.embed.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for n, p in draft.named_parameters() if not n.startswith("embed.")], lr=1e-6)
    tokens = torch.randint(0, 8000, (args.rows, args.length), generator=torch.Generator().manual_seed(0))
    times = {"float32": [], "bf16 autocast": []}
    for _ in range(args.repeats):  # interleaved, so drifting load hits both alike
        for name in times:
            times[name].append(step_seconds(draft, opt, tokens, bf16=name != "float32"))
    medians = {name: statistics.median(ts[1:]) for name, ts in times.items()}  # the first is warm-up
    for name, m in medians.items():
        print(f"{name}: {m:.2f} s per step ({args.rows} x {args.length} tokens, {args.threads} thread(s))")
    print(f"bf16 autocast is {medians['float32'] / medians['bf16 autocast']:.2f}x faster")


if __name__ == "__main__":
    main()
