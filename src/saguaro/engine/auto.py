"""What `mode="auto"` runs for one decode round: speculation (SSD) or plain decoding (AR).

Every mode verifies against the same target distribution, so this choice moves speed, never the
output distribution. Until the engine measures each candidate's tokens/s as it runs, the rule is
the conservative one the recorded runs support (2-core AMD EPYC, held-out chat prompts, ABAB):

- b = 1, greedy: SSD was 1.06-1.11x AR given both cores, so SSD runs;
- any sampled row: SSD was 0.94-0.99x AR at T=1 (the server's default), so AR runs;
- b > 1: 8 concurrent server clients got under half of plain batched decoding from SSD, since
  verifying K+1 tokens per row turns compute-bound as the batch grows, so AR runs.

When AR runs, the target takes every core and the draft worker idles; SSD resumes when the batch
is back to one greedy row (the drafter catches up on the tokens it missed with one just-in-time
draft).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundChoice:
    mode: str  # "ssd" or "ar"
    reason: str  # why, for metrics["auto_reason"]


def choose_round(batch: int, sampled_rows: int) -> RoundChoice:
    """The mode of the next round for a running batch of `batch` rows, `sampled_rows` of them at T > 0."""
    if sampled_rows:
        return RoundChoice("ar", f"{sampled_rows} sampled row(s): SSD measured below AR at T > 0")
    if batch > 1:
        return RoundChoice("ar", f"batch {batch} > 1: SSD measured below batched AR")
    return RoundChoice("ssd", "one greedy row: SSD measured above AR")
