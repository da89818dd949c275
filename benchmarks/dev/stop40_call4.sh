#!/usr/bin/env bash
# Stop 40's fourth device command (issue 14), about 5 minutes: 1. the soft-cap forward again
# (call 3's tokamax took 0.967 ms against 0.592 in stop 39: rerun before scoring the cell);
# 2. the auto check (forward, H 64/128/256 x T 1k/4k/16k) now that jattn's cuDNN call runs the
# inference forward when the lse is dropped.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 80 python3 -m benchmarks.flash_features --features soft_cap --modes fwd --repeats 9 \
    --json "$out/flash_features_h200_stop40_soft_cap.json" > "$out/features.txt" 2>&1
grep -h '"ms"' "$out/features.txt" | cut -c1-160
timeout 170 python3 -m benchmarks.flash --head-dims 64 128 256 --lengths 1024 4096 16384 \
    --modes fwd --peers jattn_auto cudnn tokamax_mosaic \
    --json "$out/flash_h200_auto_check_fwd_stop40.json" > "$out/auto.txt" 2>&1
grep -h '"ms"' "$out/auto.txt" | cut -c1-150
