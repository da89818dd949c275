#!/usr/bin/env bash
# Stop 42's second device command (issue 14), about 9 minutes: 1. the H = 256 forward+backward
# rows with the dq kernel on 32-key halves (DQ_HALF_KEYS, on by default), jattn mosaic beside
# cuDNN (tokamax's rows are stop 39's: its code did not change); 2. the dispatch table rebuilt
# from them and jattn auto timed on it; 3. the -m gpu half-key cases; 4. what the dk/dv kernel's
# 64-byte swizzle costs without query halves (DKDV_SWIZZLE 128 vs 64, QUERY_SPLIT off).
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
rows="$out/flash_h200_bf16_fwdbwd_stop42_h256.json"
timeout 230 python3 -m benchmarks.flash --head-dims 256 --lengths 1024 2048 4096 8192 16384 \
    --modes fwd+bwd --peers jattn_mosaic cudnn --json "$rows" > "$out/h256.txt" 2>&1
grep -h '"ms"' "$out/h256.txt" | cut -c1-150
python3 -m benchmarks.flash --merge benchmarks/results/flash_h200_bf16_fwdbwd_stop41.json "$rows" \
    --json "$out/fwdbwd_merged.json" > /dev/null
python3 -m benchmarks.dispatch_table benchmarks/results/flash_h200_bf16_fwd_stop40.json \
    "$out/fwdbwd_merged.json" && cp jattn/autotune/dispatch_tables/nvidia_h200.json "$out/"
timeout 90 python3 -m benchmarks.flash --head-dims 256 --lengths 1024 4096 16384 \
    --modes fwd+bwd --peers jattn_auto --json "$out/flash_h200_bf16_fwdbwd_stop42_h256_auto.json" \
    > "$out/h256_auto.txt" 2>&1
grep -h '"ms"' "$out/h256_auto.txt" | cut -c1-150
gpu_tests half 90 tests/test_flash_mosaic.py -k "dq_half_keys"
timeout 140 python3 - "$out/dkdv_swizzle_ab_h200.json" <<'PY' > "$out/swizzle_ab.txt" 2>&1
import sys

from benchmarks.dev import switch_ab
from pallas_kernels import flash_mosaic_bwd

flash_mosaic_bwd.QUERY_SPLIT = False  # both consumers on all of S^T, dP^T: only the swizzle moves
switch_ab.main(["--switch", "DKDV_SWIZZLE", "--values", "128", "64", "--head-dims", "256",
                "--lengths", "16384", "--causal", "0", "1", "--repeats", "5", "--json", sys.argv[1]])
PY
grep -h '"ms"\|error' "$out/swizzle_ab.txt" | cut -c1-60,150-260
