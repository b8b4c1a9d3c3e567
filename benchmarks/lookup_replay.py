"""Greedy replay: tokens per round when each round's K-token proposal comes from the draft, from
prompt lookup, or from prompt lookup only when the context repeats its last n tokens.

Greedy decoding is deterministic, so a proposal's accepted length is its common prefix with the
target's own continuation; the replay needs no verification passes and no timing. It measures the
choice behind `--lookup-min-match`.

    python benchmarks/lookup_replay.py [--k 4] [--num-prompts 4] [--max-tokens 64]
"""

from __future__ import annotations

import argparse

import torch

from saguaro import LLM, SamplingParams
from saguaro.embedded import embedded_draft_path
from saguaro.engine.speculative import load_draft
from saguaro.engine.speculators import NgramSpeculator
from saguaro.prompts import load_prompts


@torch.inference_mode()
def draft_greedy(draft, context: list[int], k: int) -> list[int]:
    ids, out = list(context), []
    for _ in range(k):  # no cache reuse: a replay, not a speed measurement
        logits = draft(torch.tensor([ids]), draft.new_cache(1, len(ids) + 1),
                       logits_at=torch.tensor([[len(ids) - 1]]))[0, 0]
        token = int(draft.output_token_ids[logits.argmax()]) if draft.output_token_ids is not None \
            else int(logits.argmax())
        out.append(token)
        ids.append(token)
    return out


def accepted(proposal: list[int], truth: list[int]) -> int:
    n = 0
    for p, t in zip(proposal, truth):
        if p != t:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--datasets", default="humaneval,sharegpt")
    args = ap.parse_args()
    llm = LLM(mode="ar", threads=1)
    draft = load_draft(embedded_draft_path(), llm.target, llm.tokenizer)
    ngram = NgramSpeculator()
    policies = {"draft": None, "lookup always": 0, "lookup if n >= 2": 2, "lookup if n >= 3": 3}
    for dataset in args.datasets.split(","):
        rounds = dict.fromkeys(policies, 0)
        tokens = dict.fromkeys(policies, 0)
        for text in load_prompts(dataset, "eval")[: args.num_prompts]:
            prompt = llm.tokenizer.encode_chat([{"role": "user", "content": text}])
            out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=args.max_tokens))[0].token_ids
            for name, min_match in policies.items():
                pos = 0
                while pos < len(out) - 1:
                    context = prompt + out[:pos]
                    lookup, n = ngram.match(context, args.k)
                    use_lookup = min_match is not None and n >= min_match
                    proposal = lookup if use_lookup else draft_greedy(draft, context, args.k)
                    step = accepted(proposal, out[pos : pos + args.k]) + 1
                    rounds[name] += 1
                    tokens[name] += step
                    pos += step
        print(f"{dataset}: tokens per round (K={args.k}) "
              + ", ".join(f"{name} {tokens[name] / rounds[name]:.2f}" for name in policies))


if __name__ == "__main__":
    main()
