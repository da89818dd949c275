#!/usr/bin/env bash
# Stop 41's third device command (issue 14), about 8 minutes: the forward+backward table's rows
# that this stop's backward changes move (the dq kernel longest first; the H = 256 dk/dv kernel's
# query halves), beside cuDNN and tokamax: H = 128 causal from 2k, then H = 256 from 1k.
set -uo pipefail
source benchmarks/gpu_env.sh
peers="jattn_auto jattn_mosaic cudnn tokamax_mosaic"
timeout 150 python3 -m benchmarks.flash --head-dims 128 --lengths 2048 4096 8192 16384 \
    --causal true --modes fwd+bwd --peers $peers \
    --json "$out/flash_h200_bf16_fwdbwd_stop41_h128.json" > "$out/h128.txt" 2>&1
grep -h '"ms"' "$out/h128.txt" | cut -c1-150
timeout 300 python3 -m benchmarks.flash --head-dims 256 --lengths 1024 2048 4096 8192 16384 \
    --modes fwd+bwd --peers $peers \
    --json "$out/flash_h200_bf16_fwdbwd_stop41_h256.json" > "$out/h256.txt" 2>&1
grep -h '"ms"' "$out/h256.txt" | cut -c1-150
