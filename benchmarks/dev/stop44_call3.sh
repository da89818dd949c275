#!/usr/bin/env bash
# (Ran in stop 44 against PAIRED_PRODUCTS; after it the switch is flash_mosaic_bwd.PAIRED_DQ_HEAD_DIMS.)
# Stop 44's third device command (issue 14), about 4 minutes: the paired products at H = 128 one
# kernel at a time (call 1 timed both together: -2% non-causal, +9% causal at 16k; at H = 64 the
# dk/dv kernel's pairing was 37-46% slower and the dq kernel's 0-5%), beside cuDNN.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
switch_ab paired_products_ab_h128_each 260 --switch PAIRED_PRODUCTS \
    --values "()" "('dq',)" "('dkdv',)" --head-dims 128 --lengths 4096 16384 --causal 0 1 \
    --repeats 5
