#!/usr/bin/env bash
# (Ran in stop 44 against PAIRED_PRODUCTS; after it the switch is flash_mosaic_bwd.PAIRED_DQ_HEAD_DIMS.)
# A device command prepared in stop 43 (issue 14), about 7 minutes: the backward's paired
# products (flash_mosaic_bwd.PAIRED_PRODUCTS: S and dP issued together, and dV and dK together,
# one wgmma wait for each pair), 1. its -m gpu cases against the oracle; 2. an A/B in one process
# beside cuDNN at H = 64 (none, dq kernel only, dk/dv kernel only, both) and H = 128 (none, both),
# forward+backward.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests paired 120 tests/test_flash_mosaic.py -k paired_products
switch_ab paired_products_ab_h64 250 --switch PAIRED_PRODUCTS \
    --values "()" "('dq',)" "('dkdv',)" "('dq','dkdv')" --head-dims 64 --lengths 4096 16384 \
    --causal 0 1 --repeats 5
switch_ab paired_products_ab_h128 130 --switch PAIRED_PRODUCTS --values "()" "('dq','dkdv')" \
    --head-dims 128 --lengths 16384 --causal 0 1 --repeats 5
