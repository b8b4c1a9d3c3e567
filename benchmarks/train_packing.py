"""One distillation step (forward, tail loss, backward) on real teacher-forced batches, padded against packed,
side by side on the same batches: the padded rows with the head at every position (the trainer before
packing), and the rows packed end to end with the head only at labelled positions (`Trainer.next_batch`).

    python benchmarks/train_packing.py --work-dir runs/grow [--threads 1] [--steps 6] [--json F]

Needs a work dir with teacher-forced shards (`saguaro distill --phase teacher-force`). Reports seconds per
step of each, their ratio, and the batches' padding and labelled fractions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from saguaro.distill.run import parse_corpus
from saguaro.distill.train import Trainer, make_forced_batch, pack_rows, row_lengths, tail_loss
from saguaro.embedded import embedded_draft_path, embedded_target_path
from saguaro.loader import load_model


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--corpus", default="onpolicy:3,sharegpt,python")
    ap.add_argument("--draft", type=Path, default=None, help="default: the shipped draft")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load_model(embedded_target_path())
    draft = load_model(args.draft or embedded_draft_path(), embeddings_from=target).float()
    draft.embed.weight.requires_grad_(False)
    corpus = parse_corpus(args.corpus)
    sources = {args.work_dir / "forced" / name: w for name, w in corpus.items() if w > 0}
    tr = Trainer(draft, sources, args.work_dir / "bench-state-unused", seed=0)
    if not tr.refresh_shards() or not tr.forced:
        raise SystemExit(f"no teacher-forced shards under {args.work_dir / 'forced'}")

    times = {"padded": [], "packed": []}
    positions = real = labelled = 0
    for step in range(args.steps + 1):
        tr.step = step
        rows = tr.next_rows()
        tokens, ids, probs, outside, weight = make_forced_batch(tr._shards, tr._shard_files, rows, tr.max_len)
        lengths = row_lengths(tr._shards, rows, tokens.shape[1])
        packed, wanted, sel = pack_rows(tokens, lengths, weight)

        def padded_step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = draft.forward_train(tokens)
            tail_loss(out.float(), ids, probs, outside, weight, tr.index).backward()

        def packed_step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = draft.forward_train(packed, tuple(lengths), wanted)
            tail_loss(out.float(), ids[sel], probs[sel], outside[sel], weight[sel], tr.index).backward()

        order = [("padded", padded_step), ("packed", packed_step)]
        for name, fn in order if step % 2 else order[::-1]:
            draft.zero_grad(set_to_none=True)
            seconds = timed(fn)
            if step:  # the first step warms up
                times[name].append(seconds)
        if step:
            positions, real, labelled = positions + tokens.numel(), real + sum(lengths), labelled + len(wanted)
    row = {name: statistics.median(t) for name, t in times.items()}
    row.update(ratio=row["padded"] / row["packed"], real_fraction=real / positions,
               labelled_fraction=labelled / positions, steps=args.steps, threads=args.threads)
    print(json.dumps(row))
    if args.json:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        meta = {"command": f"python benchmarks/train_packing.py --work-dir {args.work_dir} --threads {args.threads} "
                           f"--steps {args.steps}", "avx512_bf16": "avx512_bf16" in flags}
        args.json.write_text(json.dumps({"meta": meta, "result": row}, indent=1))


if __name__ == "__main__":
    main()
