"""How far a re-measurement block misreads speculation's speed, by how the block is counted.

Mode auto times speculation in short blocks between stretches of AR. A block of N speculative rounds
covers more of the easy text (where rounds yield K+1 tokens) than of the hard, so it reads speculation
faster than a whole run of it does; a block of N tokens covers the text as it comes (only the round
that crosses N is drawn towards long ones). Printed: the speed each schedule reads over the whole run's
(1.0 = unbiased), on synthetic text in stretches of 20-80 tokens of one acceptance rate each (0.1-0.95),
K = 4, a round taking 1 + 0.1 K + 0.1 tokens time units, 300 texts of 3000 tokens, AR taking the
`block` tokens after each block. (Replaying a logged SD run instead is itself biased: AR's blocks end
inside logged rounds, and a point inside the text falls in the long rounds more often.)

    python benchmarks/block_bias.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

K = 4


def blocks(rounds_at, length: int, block: int, by_tokens: bool) -> tuple[float, int]:
    """(seconds, tokens) a block schedule reads: speculation for `block` rounds (or tokens), then AR for
    `block` tokens, over a text of `length` tokens; rounds_at(p) is the (seconds, tokens) of the round
    starting at token p."""
    sec = tok = p = 0
    while p < length:
        got = count = 0
        while p < length and (got < block if by_tokens else count < block):
            s, n = rounds_at(p)
            sec, tok, got, count, p = sec + s, tok + n, got + n, count + 1, p + n
        p += block
    return sec, tok


def synthetic(rng: random.Random, blocks_of=(8, 12, 16)) -> dict:
    def text(length):
        out = []
        while len(out) < length:
            out += [rng.choice([0.1, 0.3, 0.5, 0.8, 0.95])] * rng.randint(20, 80)
        return out[:length]

    def sd_round(a):
        n = 1
        while n <= K and rng.random() < a:
            n += 1
        return 1.0 + 0.1 * K + 0.1 * n, n

    out = {}
    for block in blocks_of:
        reads = {"rounds": [], "tokens": []}
        for _ in range(300):
            tx = text(3000)
            whole = blocks(lambda p: sd_round(tx[p]), len(tx), 10 ** 9, True)
            for name in reads:
                s, n = blocks(lambda p: sd_round(tx[p]), len(tx), block, name == "tokens")
                reads[name].append((whole[0] / whole[1]) / (s / n))
        out[block] = {name: statistics.mean(v) for name, v in reads.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(synthetic(random.Random(args.seed)), indent=1))


if __name__ == "__main__":
    main()
