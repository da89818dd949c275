#!/usr/bin/env bash
# (Ran at commit a1624ce: OVERLAP_DKDV and its -m gpu cases were removed after this call.)
# Stop 45 (issue 14), about 6 minutes: the dk/dv kernel's FlashAttention-3 overlap
# (flash_mosaic_bwd.OVERLAP_DKDV: S^T of the next step in flight while dS^T is computed):
# 0. its -m gpu cases (compiled, against the oracle);
# 1. A/B at H = 64 with bwd_block_q = 64 (where it fits the registers by stop 44's count),
#    beside cuDNN; 2. A/B at the tuned configs (bwd_block_q = 128 there: expected to spill).
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests overlap 150 tests/test_flash_mosaic.py -k "gpu_overlapped_dkdv"
switch_ab overlap_dkdv_ab_h64_q64 170 --switch OVERLAP_DKDV --values False True \
    --head-dims 64 --lengths 4096 16384 --causal 0 1 --repeats 7 --config '{"bwd_block_q": 64}'
switch_ab overlap_dkdv_ab_h64_tuned 150 --switch OVERLAP_DKDV --values False True \
    --head-dims 64 128 --lengths 16384 --causal 0 1 --repeats 7
