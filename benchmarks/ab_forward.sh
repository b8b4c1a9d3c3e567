#!/usr/bin/env bash
# The compiled target forward at two commits, runs alternating (so drift hits both alike):
# benchmarks/forward_paths.py --paths file at 1..5 tokens per call, on a worktree of REV and on this tree.
#   benchmarks/ab_forward.sh REV THREADS ROUNDS > docs/results/forward_ab_<N>t.jsonl
set -euo pipefail
rev=$1 threads=${2:-1} rounds=${3:-2}
exec "$(dirname "$0")/ab_run.sh" "$rev" "$rounds" benchmarks/forward_paths.py --threads "$threads" --kv 300 \
  --repeats 60 --compile --paths file --tokens 1 2 3 4 5
