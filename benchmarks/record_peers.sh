#!/usr/bin/env bash
# saguaro AR (float32 and bfloat16) against llama.cpp on the embedded GGUF (Q4_1) and its F32 copy, 1 and 2
# threads, one run each (needs `make peers`). Run from the repository root.
set -uo pipefail
OUT=docs/results
for t in 1 2; do
  .venv/bin/saguaro bench --threads "$t" --modes ar,llamacpp,llamacpp-f32 --num-prompts 2 --max-tokens 64 \
    --json "$OUT/peers_f32_${t}t.json" || echo "FAILED: peers float32 $t"
  .venv/bin/saguaro bench --threads "$t" --dtype bfloat16 --modes ar,llamacpp --num-prompts 2 --max-tokens 64 \
    --json "$OUT/peers_bf16_${t}t.json" || echo "FAILED: peers bf16 $t"
done
