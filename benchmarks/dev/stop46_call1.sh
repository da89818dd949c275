#!/usr/bin/env bash
# Prepared in stop 45 (issue 14), about 8 minutes:
# 0. the -m gpu paired-products case at H = 256 (on by default there since stop 45);
# 1. the H = 256 forward+backward rows after it (T = 1k..16k, jattn mosaic beside cuDNN), to
#    merge into the forward+backward table (flash_h200_bf16_fwdbwd_stop45.json's H = 256 rows
#    are stop 42's);
# 2. the forward cells that missed 1.05x cuDNN by under 1% (H = 64 full 8k 1.042x, H = 128 full
#    8k 1.045x and 16k 1.049x): a repeat, beside cuDNN and tokamax, as the issue asks of a cell
#    within noise.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests paired_h256 100 tests/test_flash_mosaic.py -k "gpu_backward_with_paired_products and 256"
timeout 230 python3 -m benchmarks.flash --head-dims 256 --lengths 1024 2048 4096 8192 16384 \
    --modes fwd+bwd --peers jattn_mosaic cudnn \
    --json "$out/flash_h200_bf16_fwdbwd_stop46_h256.json" > "$out/h256.txt" 2>&1
grep -h '"ms"' "$out/h256.txt" | cut -c1-170
timeout 150 python3 -m benchmarks.flash --head-dims 64 128 --lengths 8192 16384 --causal false \
    --modes fwd --peers jattn_mosaic cudnn tokamax_mosaic \
    --json "$out/flash_h200_bf16_fwd_stop46_repeat.json" > "$out/fwd.txt" 2>&1
grep -h '"ms"' "$out/fwd.txt" | cut -c1-170
