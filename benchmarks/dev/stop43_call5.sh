#!/usr/bin/env bash
# Stop 43's fifth device command (issue 14), about 4 minutes: the H = 64 forward+backward rows
# (T = 2k..16k, both causal settings) with the lse in base 2 from XLA, jattn mosaic beside
# cuDNN (tokamax's rows are stop 39's: its code did not change).
set -uo pipefail
source benchmarks/gpu_env.sh
rows="$out/flash_h200_bf16_fwdbwd_stop43_h64.json"
timeout 280 python3 -m benchmarks.flash --head-dims 64 --lengths 2048 4096 8192 16384 \
    --modes fwd+bwd --peers jattn_mosaic cudnn --json "$rows" > "$out/h64.txt" 2>&1
grep -h '"ms"' "$out/h64.txt" | cut -c1-170
