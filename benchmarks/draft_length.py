"""How long should a weak draft's proposals be? A cost model from measured parts, on held-out prompts.

For each prompt (chat-templated ShareGPT, HumanEval) the target decodes greedily; the draft then reads
the same text, and at each generated position we keep its top probability and whether its argmax is
the target's token. The target's compiled step is timed over 1..K+1 tokens and the draft's over one,
as SD runs them (same threads). A round is then replayed for each rule, K fixed or "draft on only past
tokens the draft was sure of" (SD's `min_confidence`), and its tokens per unit of time compared with
plain decoding. Greedy replay: a round's proposals are accepted up to the first mismatch.

    python benchmarks/draft_length.py --threads 2 --json docs/results/draft_length_2t.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saguaro.bench import cpu_flags
from saguaro.embedded import embedded_draft_path
from saguaro.llm import LLM
from saguaro.loader import cache_root
from saguaro.models.compiled import compile_step
from saguaro.prompts import load_prompts
from saguaro.sampling import SamplingParams
from saguaro.speculators.draft import load_draft

THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)


def step_ms(model, tokens: int, kv: int, repeats: int) -> float:
    cache = model.new_cache(1, kv + tokens * (repeats + 8) + 8)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, kv)), cache)
        times = []
        for i in range(repeats + 3):
            t = time.perf_counter()
            model(torch.randint(0, 1000, (1, tokens)), cache)
            if i >= 3:
                times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def replay(rows: list[dict], k: int, tau: float, draft_cost: float, verify_cost: list[float]) -> float:
    """Tokens per target-step-time of SD under the rule (k, tau) over the recorded positions; a row
    always proposes its first token and drafts past token j only while its top probability >= tau."""
    tokens = cost = 0.0
    for r in rows:
        conf, match, i, n = r["confidence"], r["match"], 0, len(r["match"])
        while i < n:
            drafted = accepted = 0
            alive = True
            for j in range(min(k, n - i)):
                drafted += 1
                if alive and match[i + j]:
                    accepted += 1
                else:
                    alive = False
                if conf[i + j] < tau:
                    break
            cost += drafted * draft_cost + verify_cost[drafted]
            tokens += accepted + 1
            i += accepted + 1
    return tokens / cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=6, help="the longest proposal replayed")
    ap.add_argument("--kv", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--json")
    args = ap.parse_args()
    llm = LLM(mode="ar", threads=args.threads)
    draft = load_draft(embedded_draft_path(), llm.target, llm.tokenizer)
    if llm.target.compiled is not None:
        draft.compiled = compile_step(draft, cache_root() / "compiled", [(1, None)])
        for tokens in range(2, args.k + 2):
            llm.target.compiled.ensure(tokens)
    target_ms = [step_ms(llm.target, t, args.kv, args.repeats) for t in range(1, args.k + 2)]
    draft_ms = step_ms(draft, 1, args.kv, args.repeats)
    # verify_cost[n]: n proposals, n + 1 tokens, in target steps
    verify_cost = [None, *(target_ms[n] / target_ms[0] for n in range(1, args.k + 1))]
    rows: list[dict] = []
    for dataset in ("humaneval", "sharegpt"):
        for prompt in load_prompts(dataset, "eval")[: args.num_prompts]:
            ids = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=args.max_tokens))[0].outputs[0]
            text = torch.tensor([ids + out.token_ids])
            with torch.inference_mode():
                logits = draft(text, draft.new_cache(1, text.shape[1] + 8))[0].float()
            probs = logits[len(ids) - 1: len(ids) - 1 + len(out.token_ids)].softmax(-1)
            top, arg = probs.max(-1)
            if draft.output_token_ids is not None:
                arg = draft.output_token_ids[arg]
            rows.append({"dataset": dataset, "confidence": top.tolist(),
                         "match": (arg == torch.tensor(out.token_ids)).tolist()})
    report = {"meta": {"command": f"python benchmarks/draft_length.py --threads {args.threads} --num-prompts "
                       f"{args.num_prompts} --max-tokens {args.max_tokens} --k {args.k}", "cpu": cpu_flags(),
                       "target_step_ms": target_ms, "draft_step_ms": draft_ms,
                       "draft_cost": draft_ms / target_ms[0], "verify_cost": verify_cost[1:]}, "results": {}}
    for dataset in ("humaneval", "sharegpt"):
        these = [r for r in rows if r["dataset"] == dataset]
        matches = [m for r in these for m in r["match"]]
        table = {f"K={k}": {f"{tau}": replay(these, k, tau, draft_ms / target_ms[0], verify_cost)
                            for tau in THRESHOLDS} for k in range(1, args.k + 1)}
        report["results"][dataset] = {"agreement": sum(matches) / len(matches), "x_ar": table}
        print(f"{dataset}: agreement {sum(matches) / len(matches):.3f}; tokens per AR step by K (rows) and "
              f"min_confidence (columns {THRESHOLDS})")
        for name, row in table.items():
            print(f"  {name:4s} " + " ".join(f"{v:.3f}" for v in row.values()))
    print(f"draft step {draft_ms:.2f} ms = {draft_ms / target_ms[0]:.3f} of the target's; verification of "
          f"2..{args.k + 1} tokens: " + ", ".join(f"{v:.2f}" for v in verify_cost[1:]) + " steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
