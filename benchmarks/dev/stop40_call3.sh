#!/usr/bin/env bash
# Stop 40's third device command (issue 14), about 4 minutes: the cuDNN GPU tests after the
# padding mask type's fix (call 2 asked MaskType for "PADDING_"), then the features table's
# segment-id and soft-cap rows (the forward now cleans with segment ids).
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests cudnn 110 tests/test_gpu.py -k cudnn
grep -E "^FAILED|^E  " "$out/tests_cudnn.txt" | head -8 | cut -c1-300
timeout 200 python3 -m benchmarks.flash_features --json "$out/flash_features_h200_stop40.json" \
    --features segments soft_cap > "$out/features.txt" 2>&1
grep -h '"ms"' "$out/features.txt" | cut -c1-160
