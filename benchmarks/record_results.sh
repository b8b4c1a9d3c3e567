#!/usr/bin/env bash
# One recorded run for docs/results.md: the mode comparison, the five analyses, SSD vs SD on shared and
# equal hardware, AR vs transformers, then the page itself.
# Run from the repository root:  nohup benchmarks/record_results.sh > docs/results/run.log 2>&1 &
set -uo pipefail
OUT=docs/results
SAGUARO=".venv/bin/saguaro -v"
mkdir -p "$OUT/analyses"
lscpu > "$OUT/lscpu.txt"
uptime > "$OUT/load_start.txt"
ps -eo pid,ni,pcpu,etime,args --sort=-pcpu | head -6 | cut -c1-160 > "$OUT/ps_start.txt"
.venv/bin/python -c "import json; c = json.load(open('src/saguaro/assets/draft/config.json'));
print(json.dumps(c.get('saguaro_distill', {}), indent=2))" > "$OUT/draft_eval.json"

$SAGUARO bench --threads 1 --modes ar,sd,sd-ngram,ssd,hf,hf-assisted --num-prompts 4 --max-tokens 64 \
  --json "$OUT/bench.json" --plot "$OUT/bench.png" || echo "FAILED: bench"
for analysis in hit-vs-fanout c-sweep fallback-batch theorem7 fanout-shape; do
  $SAGUARO bench --threads 1 --analysis "$analysis" --num-prompts 2 --max-tokens 48 --out-dir "$OUT/analyses" \
    || echo "FAILED: $analysis"
done

.venv/bin/python benchmarks/ssd_vs_sd.py --k 4 --num-prompts 4 --max-tokens 64 --json "$OUT/ssd_vs_sd_t0.json" \
  || echo "FAILED: ssd_vs_sd T=0"
.venv/bin/python benchmarks/ssd_vs_sd.py --k 4 --num-prompts 4 --max-tokens 64 --temperature 1.0 \
  --json "$OUT/ssd_vs_sd_t1.json" || echo "FAILED: ssd_vs_sd T=1"
.venv/bin/python benchmarks/ar_speed.py --tokens 48 --repeats 3 --json "$OUT/ar_speed.json" || echo "FAILED: ar_speed"

uptime > "$OUT/load_end.txt"
.venv/bin/python benchmarks/results_md.py --results "$OUT" --out docs/results.md
