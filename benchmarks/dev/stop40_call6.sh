#!/usr/bin/env bash
# Stop 40's sixth device command (issue 14), about 3 minutes: the H = 128 shipped forward
# configs against the oracle (the causal T <= 1024 entry is now call 5's persistent grid), and
# the float16 causal forward at 1k on it (stop 38's float16 run had the old entry behind cuDNN;
# float16 takes the bfloat16 entries and order).
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests shipped_h128 130 tests/test_flash_mosaic.py -k "every_shipped_forward_config and 128"
grep -E "^FAILED" "$out/tests_shipped_h128.txt" | head -5
timeout 60 python3 -m benchmarks.flash --head-dims 128 --lengths 1024 --causal true --modes fwd \
    --dtype float16 --peers jattn_mosaic cudnn tokamax_mosaic \
    --json "$out/flash_h200_f16_h128_causal_fwd_1k_stop40.json" > "$out/f16.txt" 2>&1
grep -h '"ms"' "$out/f16.txt" | cut -c1-150
