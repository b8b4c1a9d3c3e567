#!/usr/bin/env bash
# saguaro AR against llama.cpp on the embedded GGUF (Q4_1) and its F32 copy, and transformers, at 1 and
# 2 threads, one run each (needs `make peers`): float32, bfloat16 over the file's own Q4_1/Q8_0 blocks (the
# default) and over dense dequantized weights, compiled (the default) and eager (--no-compile), and with int8
# activations (--weights file-int8) beside what they cost in quality. Run from the
# repository root on an otherwise idle machine; the first run compiles the steps (minutes, cached).
set -uo pipefail
OUT=docs/results
lscpu > "$OUT/lscpu_peers.txt"
for t in 1 2; do
  .venv/bin/saguaro bench --threads "$t" --dtype float32 --modes ar,llamacpp-f32,llamacpp,hf --num-prompts 2 \
    --max-tokens 64 --json "$OUT/peers_f32_${t}t.json" || echo "FAILED: peers float32 $t"
  .venv/bin/saguaro bench --threads "$t" --dtype bfloat16 --modes ar,llamacpp --num-prompts 2 --max-tokens 64 \
    --json "$OUT/peers_bf16_${t}t.json" || echo "FAILED: peers bf16 $t"
  .venv/bin/saguaro bench --threads "$t" --dtype bfloat16 --weights dense --modes ar,llamacpp --num-prompts 2 \
    --max-tokens 64 --json "$OUT/peers_bf16_dense_${t}t.json" || echo "FAILED: peers bf16 dense $t"
  .venv/bin/saguaro bench --threads "$t" --dtype bfloat16 --no-compile --modes ar,llamacpp --num-prompts 2 \
    --max-tokens 64 --json "$OUT/peers_bf16_eager_${t}t.json" || echo "FAILED: peers bf16 eager $t"
  .venv/bin/saguaro bench --threads "$t" --dtype bfloat16 --weights file-int8 --modes ar,llamacpp --num-prompts 2 \
    --max-tokens 64 --json "$OUT/peers_int8_${t}t.json" || echo "FAILED: peers int8 $t"
  .venv/bin/python benchmarks/forward_paths.py --threads "$t" --compile --paths file file-int8 --repeats 50 \
    --json "$OUT/forward_paths_int8_${t}t.json" || echo "FAILED: forward paths int8 $t"
done
.venv/bin/python benchmarks/activation_quality.py --num-prompts 8 --json "$OUT/activation_quality.json" \
  || echo "FAILED: activation quality"
.venv/bin/python benchmarks/bandwidth.py --json "$OUT/bandwidth.json" || echo "FAILED: bandwidth"
