#!/usr/bin/env bash
# Stop 41's first device command (issue 14), about 8 minutes: 1. the backward's dq kernel with
# its causal query tiles longest first (BACKWARD_LONGEST_FIRST) against stop 40's order, causal
# forward+backward at H 64/128/256, T 4k/16k, beside cuDNN, in one process; 2. the Mosaic
# oracle cases of the causal features (forward and backward) on the new order; 3. the auto
# check's H = 128 causal cells at 512 and 1k, after stop 40's retune sent them to mosaic.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
timeout 290 python3 -m benchmarks.dev.switch_ab --switch BACKWARD_LONGEST_FIRST \
    --values False True --head-dims 64 128 256 --lengths 4096 16384 --causal 1 --repeats 5 \
    --json "$out/backward_longest_first_ab_h200.json" > "$out/ab.txt" 2>&1
grep -h '"ms"\|error' "$out/ab.txt" | cut -c1-220
tail -3 "$out/ab.txt"
gpu_tests causal 110 tests/test_flash_mosaic.py -k "every_feature_matches_oracle and bfloat16 and causal"
timeout 70 python3 -m benchmarks.flash --head-dims 128 --lengths 512 1024 --causal true \
    --modes fwd --peers jattn_auto jattn_mosaic cudnn tokamax_mosaic \
    --json "$out/flash_h200_auto_check_h128_causal_stop41.json" > "$out/auto.txt" 2>&1
grep -h '"ms"' "$out/auto.txt" | cut -c1-150
tail -2 "$out/auto.txt"
