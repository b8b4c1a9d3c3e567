#!/usr/bin/env bash
# One recorded run of what `mode auto` and the forward paths are judged by: the default server against
# `--mode ar` under 1, 8 and 32 clients; auto against AR, SD and SSD at b=1 for T in {0, 0.7, 1}; the
# forward paths (eager and compiled, float32 and bf16, 1 and 2 threads); start-up time and peak RSS.
# Run from the repository root:  nohup benchmarks/record_auto.sh > docs/results/auto_run.log 2>&1 &
set -uo pipefail
OUT=docs/results
PY=.venv/bin/python
lscpu > "$OUT/lscpu_auto.txt"
uptime > "$OUT/load_start_auto.txt"
$PY benchmarks/forward_paths.py --threads 1 --compile --json "$OUT/forward_paths_1t.json" || echo "FAILED: forward 1t"
$PY benchmarks/forward_paths.py --threads 2 --compile --json "$OUT/forward_paths_2t.json" || echo "FAILED: forward 2t"
bash benchmarks/startup_rss.sh > "$OUT/startup_rss.txt" 2>&1 || echo "FAILED: startup"
# mode auto remembers its clocks per setup across processes (engine/auto_memory.py): start from none, so
# the first T=0 run pays the first use's measuring rounds; the T=0 run again at the end starts remembering
rm -f "${SAGUARO_CACHE:-$HOME/.cache/saguaro}/auto/clocks.json"
for t in 0 0.7 1 0-again; do
  $PY benchmarks/ssd_vs_sd.py --k 4 --num-prompts 8 --max-tokens 128 --temperature "${t%-again}" \
    --modes ar,sd-2core,sd-2core-stop,ssd,auto --json "$OUT/auto_t$t.json" || echo "FAILED: ssd_vs_sd T=$t"
done
$PY benchmarks/serve_load.py --clients 1,8,32 --temperatures 0,1 --max-tokens 96 --repeats 4 \
  --json "$OUT/serve_load.json" || echo "FAILED: serve_load"
uptime > "$OUT/load_end_auto.txt"
