#!/usr/bin/env bash
# One device command written in stop 39 for the next session (issue 14), about 4 minutes:
# 1. the two -m gpu oracle cases of the shipped forward configs that stop 39's calls did not
#    reach (H = 256 full T <= 4096 and causal T <= 1024; run all four H = 256 cases);
# 2. the segment-id forward with the redo against the cleaning at the features table's shape
#    (causal, 4 unequal documents, H = 128, T = 4k), in one process: 0.722 ms with the redo in
#    stop 39 against 0.667 with the cleaning in stop 37;
# 3. jattn's cuDNN path against jax.nn's own call (return_residual's cost, the lse's rounding);
# 4. ptxas of the H = 64 causal T <= 4096 entry (the redo with the softmax overlap's two score
#    tiles: `redo_defaults` counts one).
# From the repository root, .whl carried:
#   bash benchmarks/dev/stop40_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests shipped_h256 100 tests/test_flash_mosaic.py -k "every_shipped_forward_config and 256"
ab segments_ab causal_unequal 120 --head-dim 128 --lengths 4096 --cells segments_causal \
    --settings clean redo redo_bwd
timeout 120 python3 -m benchmarks.dev.cudnn_residual_ab --json "$out/cudnn_residual_ab.json" \
    > "$out/cudnn_residual.txt" 2>&1
grep -h '"ms"\|lse_error' "$out/cudnn_residual.txt" | cut -c1-200
MOSAIC_GPU_DUMP_PTXAS=1 timeout 40 python3 -m benchmarks.dev.mosaic_one_call --causal \
    --head-dim 64 --length 4096 --variant redo_hidden_bk128_overlap --calls 0 \
    > "$out/ptxas_h64_overlap_redo.txt" 2>&1
grep -iE "spill|registers" "$out/ptxas_h64_overlap_redo.txt" | sort | uniq -c | head -4
