#!/usr/bin/env bash
# A device command prepared in stop 43 (issue 14), about 7 minutes: the backward's paired
# products (flash_mosaic_bwd.PAIRED_PRODUCTS: S and dP issued together, and dV and dK together,
# one wgmma wait for each pair), 1. its -m gpu cases against the oracle; 2. an A/B in one process
# beside cuDNN at H = 64 (none, dq kernel only, dk/dv kernel only, both) and H = 128 (none, both),
# forward+backward.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests paired 120 tests/test_flash_mosaic.py -k paired_products
timeout 250 python3 -m benchmarks.dev.switch_ab --switch PAIRED_PRODUCTS \
    --values "()" "('dq',)" "('dkdv',)" "('dq','dkdv')" --head-dims 64 --lengths 4096 16384 \
    --causal 0 1 --repeats 5 --json "$out/paired_products_ab_h64.json" > "$out/ab_h64.txt" 2>&1
grep -h '"ms"\|error' "$out/ab_h64.txt" | sed -E 's/"max_abs_diff".*"peer"/"peer"/' | cut -c1-200
timeout 130 python3 -m benchmarks.dev.switch_ab --switch PAIRED_PRODUCTS \
    --values "()" "('dq','dkdv')" --head-dims 128 --lengths 16384 \
    --causal 0 1 --repeats 5 --json "$out/paired_products_ab_h128.json" > "$out/ab_h128.txt" 2>&1
grep -h '"ms"\|error' "$out/ab_h128.txt" | sed -E 's/"max_abs_diff".*"peer"/"peer"/' | cut -c1-200
