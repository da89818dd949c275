#!/usr/bin/env bash
# (Ran in stop 44 against PAIRED_PRODUCTS; after it the switch is flash_mosaic_bwd.PAIRED_DQ_HEAD_DIMS.)
# Stop 44's fourth device command (issue 14), about 3 minutes: the dq kernel's paired products
# again (call 3 at H = 128: 0.2% slower to 2.2% faster), at H = 128 on 8k and 16k beside cuDNN,
# to decide a default by head dim.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
switch_ab paired_dq_ab_h128 190 --switch PAIRED_PRODUCTS --values "()" "('dq',)" \
    --head-dims 128 --lengths 8192 16384 --causal 0 1 --repeats 7
