#!/usr/bin/env bash
# Stop 43's fourth device command (issue 14), about 5 minutes: the backward's lse in base 2 made
# in XLA (flash_mosaic_bwd.LSE_BASE2_IN_XLA, a switch removed after this A/B; 1.5 fewer
# instructions per score element in the dk/dv kernel, call 3's SASS): 1. the -m gpu every-feature
# cases in bf16 (gradients from the Mosaic backward), 2. an A/B in one process beside cuDNN,
# forward+backward, H = 64 and 128.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests lse 110 tests/test_flash_mosaic.py -k "test_gpu_every_feature_matches_oracle and bfloat16"
timeout 260 python3 -m benchmarks.dev.switch_ab --switch LSE_BASE2_IN_XLA --values False True \
    --head-dims 64 128 --lengths 4096 16384 --causal 0 1 --repeats 5 \
    --json "$out/lse_base2_ab_h200.json" > "$out/ab_lse.txt" 2>&1
grep -h '"ms"\|error' "$out/ab_lse.txt" | sed -E 's/"max_abs_diff".*"peer"/"peer"/' | cut -c1-200
