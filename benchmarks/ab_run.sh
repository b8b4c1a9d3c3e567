#!/usr/bin/env bash
# A benchmark at two commits, runs alternating (so drift hits both alike): SCRIPT with ARGS on a worktree
# of REV, then on this tree, ROUNDS times. Each run's last output line (one JSON object) is printed with
# the commit it ran (this tree's label gets "+" when it has uncommitted changes).
#   benchmarks/ab_run.sh REV ROUNDS benchmarks/draft_after_target.py --threads 2 > out.jsonl
set -euo pipefail
rev=$1 rounds=$2 script=$3
shift 3
here=$(pwd)
tree=$(mktemp -d)/tree
git worktree add -q --detach "$tree" "$rev"
trap 'git worktree remove --force "$tree"' EXIT
PY=${PY:-$here/.venv/bin/python}
mine=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo +)
theirs=$(git rev-parse --short "$rev")
for _ in $(seq "$rounds"); do
  for src in "$tree" "$here"; do
    label=$([ "$src" = "$here" ] && echo "$mine" || echo "$theirs")
    PYTHONPATH=$src/src "$PY" "$here/$script" "$@" 2>/dev/null | tail -1 | sed "s/^{/{\"commit\": \"$label\", /"
  done
done
