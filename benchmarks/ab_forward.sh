#!/usr/bin/env bash
# The compiled target forward at two commits, runs alternating (so drift hits both alike):
# benchmarks/forward_paths.py --paths file at 1..5 tokens per call, on a worktree of REV and on this tree.
#   benchmarks/ab_forward.sh REV THREADS ROUNDS > docs/results/forward_ab_<N>t.jsonl
set -euo pipefail
rev=$1 threads=${2:-1} rounds=${3:-2}
here=$(pwd)
tree=$(mktemp -d)/tree
git worktree add -q --detach "$tree" "$rev"
trap 'git worktree remove --force "$tree"' EXIT
PY=${PY:-$here/.venv/bin/python}
for _ in $(seq "$rounds"); do
  for src in "$tree" "$here"; do
    label=$([ "$src" = "$here" ] && git rev-parse --short HEAD || git rev-parse --short "$rev")
    PYTHONPATH=$src/src "$PY" "$here/benchmarks/forward_paths.py" --threads "$threads" --kv 300 --repeats 60 \
      --compile --paths file --tokens 1 2 3 4 5 2>/dev/null | tail -1 | sed "s/^{/{\"commit\": \"$label\", /"
  done
done
