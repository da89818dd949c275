#!/usr/bin/env bash
# Prepared in stop 41 for the next session (issue 14), about 7 minutes: what the 64-byte swizzle
# costs the H = 256 dk/dv kernel without query halves (QUERY_SPLIT off, DKDV_SWIZZLE 64 against
# 128), and the H = 256 causal 16k forward+backward row that stop 41's table run did not reach.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 300 python3 - "$out/dkdv_swizzle_ab_h200.json" <<'PY' > "$out/swizzle_ab.txt" 2>&1
import sys

from benchmarks.dev import switch_ab
from pallas_kernels import flash_mosaic_bwd

flash_mosaic_bwd.QUERY_SPLIT = False  # both consumers on all of S^T, dP^T: only the swizzle moves
switch_ab.main(["--switch", "DKDV_SWIZZLE", "--values", "128", "64", "--head-dims", "256",
                "--lengths", "4096", "16384", "--causal", "0", "1", "--repeats", "5",
                "--json", sys.argv[1]])
PY
grep -h '"ms"\|error' "$out/swizzle_ab.txt" | cut -c1-60,150-260
timeout 150 python3 -m benchmarks.flash --head-dims 256 --lengths 16384 --causal true \
    --modes fwd+bwd --peers jattn_auto jattn_mosaic cudnn tokamax_mosaic \
    --json "$out/flash_h200_bf16_fwdbwd_h256_causal_16k.json" > "$out/h256_16k.txt" 2>&1
grep -h '"ms"' "$out/h256_16k.txt" | cut -c1-150
