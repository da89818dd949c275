#!/usr/bin/env bash
# Stop 40's fifth device command (issue 14), about 4 minutes: `jattn autotune` of the forward
# fields at H = 128 causal T = 512 (the forward trails tokamax 0.87x there; call 2's tune at
# 1k found every candidate within 3%), then the H = 128 causal forward at 512 and 1k with the
# tuned entry (the tuner's cache as the user cache) against cuDNN and tokamax.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 170 python3 -m jattn.cli autotune --implementation mosaic --head-dims 128 \
    --dtypes bfloat16 --causal yes --lengths 512 --searches forward schedule --no-progress \
    --cache "$out/autotune_h128_causal_512.json" \
    --log "$out/autotune_mosaic_h200_h128_causal_512_forward_stop40.jsonl" > "$out/autotune.txt" 2>&1
tail -4 "$out/autotune.txt"
JATTN_AUTOTUNE_CACHE="$out/autotune_h128_causal_512.json" timeout 60 python3 -m benchmarks.flash \
    --head-dims 128 --lengths 512 1024 --causal true --modes fwd \
    --peers jattn_mosaic cudnn tokamax_mosaic \
    --json "$out/flash_h200_h128_causal_fwd_512_tuned_stop40.json" > "$out/h128.txt" 2>&1
grep -h '"ms"' "$out/h128.txt" | cut -c1-150
