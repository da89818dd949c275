#!/usr/bin/env bash
# A device command prepared in stop 44 (issue 14), about 8 minutes: after the dq kernel's paired
# products went on at H = 128 (PAIRED_DQ_HEAD_DIMS, timed on plain and causal attention only):
# 0. the -m gpu cases that now run it: flex at real sizes, long sequences by head dim;
# 1. the features table's forward+backward rows at H = 128, T = 4k (soft cap, segments, window,
#    GQA 8:1, q_offset), jattn mosaic beside tokamax and cuDNN, against stop 39-40's rows;
# 2. the pairing at H = 256 (not timed yet): an A/B in one process beside cuDNN.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests h128_paired 130 tests/test_flex.py tests/test_flash_mosaic.py \
    -k "mosaic_flex_real_size_on_gpu or head_dims_long_sequence"
timeout 200 python3 -m benchmarks.flash_features --modes fwd+bwd \
    --peers jattn_mosaic tokamax_mosaic cudnn \
    --features soft_cap segments window gqa_8_to_1 q_offset \
    --json "$out/flash_features_h200_stop45_fwdbwd.json" > "$out/features.txt" 2>&1
grep -h '"ms"' "$out/features.txt" | cut -c1-170
switch_ab paired_dq_ab_h256 130 --switch PAIRED_DQ_HEAD_DIMS --values "(128,)" "(128, 256)" \
    --head-dims 256 --lengths 4096 16384 --causal 0 1 --repeats 7
