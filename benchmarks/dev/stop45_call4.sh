#!/usr/bin/env bash
# Stop 45 (issue 14), about 5 minutes: what call 2's time limits cut: the features table's
# forward+backward rows of gqa_8_to_1 and q_offset at H = 128, T = 4k (after the dq pairing),
# and the dq pairing's A/B at H = 256, 16k causal.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
timeout 170 python3 -m benchmarks.flash_features --modes fwd+bwd \
    --peers jattn_mosaic tokamax_mosaic cudnn --features gqa_8_to_1 q_offset \
    --json "$out/flash_features_h200_stop45_fwdbwd_rest.json" > "$out/features.txt" 2>&1
grep -h '"ms"' "$out/features.txt" | cut -c1-170
switch_ab paired_dq_ab_h256_causal 130 --switch PAIRED_DQ_HEAD_DIMS --values "(128,)" \
    "(128, 256)" --head-dims 256 --lengths 16384 --causal 1 --repeats 7
