"""What the int8 activations of the block path cost in quality, as llama.cpp's KL-divergence tool measures
a quantization: the embedded target scores held-out prompts (teacher forcing) through each path, and
every position's next-token distribution is compared with float32 over the same dequantized weights.

Paths: bfloat16 over dense weights, bfloat16 over the GGUF file's own blocks with bfloat16 activations
(csrc/block_linear.cpp), and the same blocks with int8 activations (csrc/int8_block_linear.cpp).
Reported per path: top-1 agreement with float32, mean KL(float32 || path), and perplexity of the text.

    python benchmarks/activation_quality.py --num-prompts 8 --json docs/results/activation_quality.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from saguaro.bench import cpu_flags
from saguaro.embedded import embedded_target_path
from saguaro.gguf_blocks import read_blocks
from saguaro.loader import cache_root, load_model, resolve_checkpoint
from saguaro.models import cpu_kernels
from saguaro.models.linear import use_file_blocks, use_kernels
from saguaro.prompts import load_prompts
from saguaro.tokenizer import Tokenizer

PATHS = ("float32", "bf16-dense", "bf16-blocks", "int8-blocks")


def model_for(path: str):
    dtype = torch.float32 if path == "float32" else torch.bfloat16
    model = load_model(embedded_target_path(), dtype=dtype)
    if path.endswith("blocks"):
        taken = use_file_blocks(model, read_blocks(embedded_target_path(), cpu_kernels.BLOCK_FORMATS),
                                cache_root() / "kernels", int8_activations=path.startswith("int8"))
        assert taken, f"{path}: this CPU cannot run the block kernels"
    elif path == "bf16-dense":
        use_kernels(model, cache_root() / "kernels")
    return model


def log_probs(model, ids: list[int]) -> torch.Tensor:
    """[T - 1, V] float64 log-probabilities of each next token, scored in one forward."""
    cache = model.new_cache(1, len(ids))
    logits = model(torch.tensor([ids]), cache)[0, :-1]
    return torch.log_softmax(logits.double(), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=8, help="per dataset (held-out split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.load(resolve_checkpoint(embedded_target_path()))
    texts = {d: [tokenizer.encode(p)[:512] for p in load_prompts(d)[: args.num_prompts]]
             for d in ("humaneval", "sharegpt")}
    scored: dict[str, dict[str, list[torch.Tensor]]] = {}
    with torch.inference_mode():
        for path in PATHS:
            model = model_for(path)
            scored[path] = {d: [log_probs(model, ids) for ids in seqs] for d, seqs in texts.items()}
            del model
    rows = []
    for dataset, seqs in texts.items():
        for path in PATHS:
            agree = kl = nll = n = 0.0
            for ids, ref, got in zip(seqs, scored["float32"][dataset], scored[path][dataset]):
                agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
                kl += (ref.exp() * (ref - got)).sum(-1).sum().item()
                nll -= got.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
                n += len(ids) - 1
            rows.append({"dataset": dataset, "path": path, "positions": int(n), "top1_agreement": agree / n,
                         "mean_kl": kl / n, "perplexity": math.exp(nll / n)})
            print(f"{dataset:9s} {path:12s} top-1 agreement {agree / n:.4f}  mean KL {kl / n:.5f}  "
                  f"perplexity {math.exp(nll / n):.3f}  ({int(n)} positions)")
    if args.json:
        meta = {"command": "python benchmarks/activation_quality.py --num-prompts "
                f"{args.num_prompts} --threads {args.threads}", "cpu": cpu_flags()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
