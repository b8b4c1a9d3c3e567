#!/usr/bin/env bash
# Wall time from process start to the first generated token (a 1-token generation), and peak RSS, of
# `saguaro generate` on the embedded pair: the default (auto: SSD engine, bf16 where native, compiled
# steps loaded from the cache) against the previous default (float32, eager). Run each twice; the
# second run is the "second start" (compiled libraries and the converted checkpoint cached).
# Run from the repository root on an idle machine: bash benchmarks/startup_rss.sh > docs/results/startup_rss.txt
set -uo pipefail
PROMPT="Write a Python function that checks whether a number is prime."
for config in "default:" "float32-eager:--dtype float32 --no-compile"; do
  name=${config%%:*}; flags=${config#*:}
  for run in 1 2; do
    /usr/bin/time -f "$name run $run: wall %e s, peak RSS %M KB" .venv/bin/saguaro generate --chat --max-tokens 1 \
      $flags "$PROMPT" > /dev/null 2> /tmp/startup_rss.err
    grep "peak RSS" /tmp/startup_rss.err
  done
done
