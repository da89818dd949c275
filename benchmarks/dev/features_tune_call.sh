#!/usr/bin/env bash
# One device command (issue 14, stop 39): 1. `jattn autotune` of the forward fields at H = 64
# causal T <= 4096, now that the forward's redo runs on 64 x 128 score tiles (the stop 35 tune
# picked 64 x 256 there at 0.722 ms against 0.744 for 64 x 128, both cleaning; the redo took
# 3-5% off 64 x 128 in stop 39's first call). 2. The features table (H = 128, T = 4k) again:
# segment ids, window, soft cap, GQA and q_offset run the redo defaults since stop 38.
# From the repository root, .whl carried (about 8 minutes):
#   bash benchmarks/dev/features_tune_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 170 python3 -m jattn.cli autotune --implementation mosaic --head-dims 64 \
    --dtypes bfloat16 --causal yes --lengths 4096 --searches forward schedule --no-progress \
    --cache "$out/autotune_h64_causal.json" --log "$out/autotune_mosaic_h200_h64_causal_forward_stop39.jsonl" \
    > "$out/autotune.txt" 2>&1
tail -12 "$out/autotune.txt"
timeout 300 python3 -m benchmarks.flash_features --json "$out/flash_features_h200_stop39.json" \
    > "$out/features.txt" 2>&1
grep -h '"ms"' "$out/features.txt" | cut -c1-140 | tail -60
