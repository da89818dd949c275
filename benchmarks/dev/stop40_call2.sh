#!/usr/bin/env bash
# Stop 40's second device command (issue 14), about 8 minutes:
# 1. the cuDNN GPU tests: float32 lse (the cuDNN wrapper under jax.nn), the lse's gradient that
#    cuDNN's backward drops, the inference forward without return_residual;
# 2. the segment-id features at real sizes against the oracle (the forward now cleans there);
# 3. cudnn_residual_ab again: jattn's cudnn without the residual against jax.nn's own call;
# 4. `jattn autotune` of the forward fields at H = 128 causal T <= 1024 (the table's entry is
#    stop 35's, non-persistent, without the redo; the forward trails tokamax at 512 and 1k).
# From the repository root, .whl carried:
#   bash benchmarks/dev/stop40_call2.sh
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests cudnn 120 tests/test_gpu.py -k cudnn
grep -E "FAILED|Error" "$out/tests_cudnn.txt" | head -8 | cut -c1-300
gpu_tests segments 90 tests/test_flash_mosaic.py -k "every_feature_matches and segment"
timeout 100 python3 -m benchmarks.dev.cudnn_residual_ab --json "$out/cudnn_residual_ab.json" \
    > "$out/cudnn_residual.txt" 2>&1
grep -h '"ms"\|lse_error' "$out/cudnn_residual.txt" | cut -c1-220
timeout 170 python3 -m jattn.cli autotune --implementation mosaic --head-dims 128 \
    --dtypes bfloat16 --causal yes --lengths 1024 --searches forward schedule --no-progress \
    --cache "$out/autotune_h128_causal.json" \
    --log "$out/autotune_mosaic_h200_h128_causal_1k_forward_stop40.jsonl" > "$out/autotune.txt" 2>&1
tail -12 "$out/autotune.txt"
