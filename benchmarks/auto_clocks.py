"""Do mode auto's clocks read what the modes deliver end to end?

One auto SD engine (what `LLM()` runs on a CPU) serves every request, its round rule replaced by a fixed
one that logs each round: "sd" (every round speculates), "ar" (every round plain), "alt" (blocks of
`--block` rounds of each, as auto's re-timing ran them before 27d731e) and "alt-tokens" (blocks of `--block`
timed tokens, as it runs them now). Schedules take turns prompt by prompt. Reported per dataset: end-to-end
tokens/s (wall time per request, prefill included), and what clocks built from the logged rounds say: all
rounds, settled rounds (the first after a switch left out, as auto does), auto's stall filter (rounds over
2x the median left out), and the alternating blocks paired with their neighbours. The JSON keeps the pure
SD schedule's rounds (`rounds_log`).

    python benchmarks/auto_clocks.py --temperature 1 --num-prompts 8 --max-tokens 128 --block 16 --json F

Recorded (docs/results/dec01b/auto_clocks_t{0,1}.json, --block 16): at T = 0 the pure runs' rounds had SD
at 1.56 / 1.49x AR (HumanEval / ShareGPT), end to end 1.38 / 1.40 (prefill dilutes it); blocks of rounds
read 1.65 / 1.60, blocks of tokens 1.64 / 1.47. At T = 1: pure rounds 1.06 / 1.04, end to end 1.00 / 1.02,
blocks of rounds 1.05 / 0.97, of tokens 1.08 / 1.00. One run each: the bias of round blocks (~7%, see
block_bias.py) is near this machine's run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time

from saguaro import LLM
from saguaro.bench import EngineRunner, cpu_flags, run_batch
from saguaro.engine.auto import STALL_FACTOR, RoundChoice
from saguaro.prompts import load_prompts
from saguaro.sampling import SamplingParams


class LoggedRule:
    """A fixed mode schedule that records (mode, seconds, tokens, settled) of every round."""

    def __init__(self, block: int):
        self.block, self.schedule, self.calls, self.log = block, "ar", 0, []
        self.reset()

    def reset(self) -> None:
        self.calls, self._last, self._mode, self._count = 0, None, "sd", 0

    def __call__(self, batch: int, sampled: int) -> RoundChoice:
        if self.schedule == "alt":  # blocks of `block` rounds
            mode = "sd" if (self.calls // self.block) % 2 == 0 else "ar"
        elif self.schedule == "alt-tokens":  # blocks of `block` emitted tokens (the settling round aside)
            if self._count >= self.block:
                self._mode, self._count = ("ar" if self._mode == "sd" else "sd"), 0
            mode = self._mode
        else:
            mode = self.schedule
        self.calls += 1
        return RoundChoice(mode, f"auto_clocks: {self.schedule}")

    def observe(self, choice, batch, sampled, seconds, tokens) -> None:
        settled = self._last == choice.mode
        self._last = choice.mode
        if settled:
            self._count += tokens
        self.log.append((self.schedule, choice.mode, seconds, tokens, settled))


def per_token(rounds, stall_filter: bool) -> float:
    if stall_filter:
        limit = STALL_FACTOR * statistics.median(s for s, _ in rounds)
        rounds = [(s, n) for s, n in rounds if s <= limit]
    return sum(s for s, _ in rounds) / sum(max(n, 1) for _, n in rounds)


def paired_ratio(log) -> tuple[float, int]:
    """SD's seconds per token over AR's, each alternating block against the block before it (AR the yardstick)."""
    blocks, cur = [], None
    for _, mode, sec, tok, settled in log:
        if cur is None or cur[0] != mode:
            cur = (mode, [])
            blocks.append(cur)
        if settled:
            cur[1].append((sec, max(tok, 1)))
    num = den = 0.0
    pairs = 0
    for (m1, r1), (m2, r2) in zip(blocks, blocks[1:]):
        if m1 == m2 or not r1 or not r2:
            continue
        sd, ar = (r1, r2) if m1 == "sd" else (r2, r1)
        ar_pt = sum(s for s, _ in ar) / sum(n for _, n in ar)
        num += sum(s for s, _ in sd) / ar_pt
        den += sum(n for _, n in sd)
        pairs += 1
    return (num / den if den else math.nan), pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--datasets", default="humaneval,sharegpt")
    ap.add_argument("--block", type=int, default=9,
                    help="rounds per block in the alternating schedule, tokens per block in alt-tokens")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    llm = LLM(mode="ar")
    engine = llm.make_engine("sd", None, args.k, auto=True)
    rule = LoggedRule(args.block)
    engine.round_rule = rule
    runner = EngineRunner(engine)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    runner.generate([llm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])],
                    [SamplingParams(temperature=args.temperature, max_tokens=8)])
    schedules = ["sd", "ar", "alt", "alt-tokens"]
    report = {"config": vars(args) | {"cpu": cpu_flags()}, "results": {}}
    for d in args.datasets.split(","):
        prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}])
                   for p in load_prompts(d, "eval")[: args.num_prompts]]
        rule.log = []
        walls = {s: [0.0, 0] for s in schedules}
        for i, ids in enumerate(prompts):
            for s in schedules[i % len(schedules):] + schedules[: i % len(schedules)]:
                rule.schedule = s
                rule.reset()
                out = run_batch(runner, [ids], [params])
                walls[s][0] += out["wall_s"]
                walls[s][1] += out["tokens"]
                time.sleep(0.05)
        res = {f"{s}_tokens_per_s": walls[s][1] / walls[s][0] for s in schedules}
        res["end_to_end_sd_over_ar"] = res["sd_tokens_per_s"] / res["ar_tokens_per_s"]
        for sched in schedules:
            for mode in ("sd", "ar"):
                settled = [(sec, tok) for s, m, sec, tok, ok in rule.log if s == sched and m == mode and ok]
                every = [(sec, tok) for s, m, sec, tok, _ in rule.log if s == sched and m == mode]
                if not settled:
                    continue
                res[f"{sched}/{mode}"] = {"rounds": len(every), "ms_per_token_all": 1000 * per_token(every, False),
                                          "ms_per_token_settled": 1000 * per_token(settled, False),
                                          "ms_per_token_filtered": 1000 * per_token(settled, True),
                                          "left_out_by_filter": len(settled) - sum(
                                              sec <= STALL_FACTOR * statistics.median(x for x, _ in settled)
                                              for sec, _ in settled)}
        wall_rounds = {m: res[f"{m}/{m}"]["ms_per_token_all"] for m in ("sd", "ar")}
        res["rounds_sd_over_ar_speed"] = wall_rounds["ar"] / wall_rounds["sd"]
        for alt in ("alt", "alt-tokens"):
            ratio, pairs = paired_ratio([e for e in rule.log if e[0] == alt])
            res[f"{alt}_paired_sd_speed_over_ar"], res[f"{alt}_pairs"] = 1 / ratio, pairs
            res[f"{alt}_sd_speed_over_ar"] = (res[f"{alt}/ar"]["ms_per_token_settled"]
                                              / res[f"{alt}/sd"]["ms_per_token_settled"])
        res["rounds_log"] = [list(e) for e in rule.log]  # (schedule, mode, seconds, tokens, settled)
        report["results"][d] = res
        print(d, json.dumps({k: v for k, v in res.items() if k != "rounds_log"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
