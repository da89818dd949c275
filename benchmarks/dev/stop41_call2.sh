#!/usr/bin/env bash
# Stop 41's second device command (issue 14), about 8 minutes: 1. the H = 256 dk/dv kernel with
# each consumer on half of a step's queries (QUERY_SPLIT: 4 matmuls per tile pair, not 6; every
# operand at a 64-byte swizzle) against both consumers on all of them, forward+backward at
# T 2k/4k/16k, causal and not, beside cuDNN, in one process; 2. the -m gpu H = 256 backward
# cases and the causal feature cases call 1 did not reach.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
timeout 290 python3 -m benchmarks.dev.switch_ab --switch QUERY_SPLIT \
    --values False True --head-dims 256 --lengths 2048 4096 16384 --causal 0 1 --repeats 5 \
    --json "$out/query_split_ab_h200.json" > "$out/ab.txt" 2>&1
grep -h '"ms"\|error' "$out/ab.txt" | cut -c1-60,150-260
tail -3 "$out/ab.txt"
gpu_tests h256 80 tests/test_flash_mosaic.py -k "head_dim_256_backward or (fused_dq_backward and window)"
gpu_tests causal 110 tests/test_flash_mosaic.py -k "every_feature_matches_oracle and bfloat16 and (window_causal or causal_window or segments_causal)"
