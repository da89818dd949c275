#!/usr/bin/env bash
# Stop 43's first device command (issue 14), about 7 minutes: 1. stop 42's prepared Nsight
# Compute run at H = 64, T = 16k (stop42_call3.sh: jattn mosaic and cuDNN per kernel, causal and
# not); 2. the forward cells that missed their 1.05x-cuDNN bar within noise (H = 128 non-causal
# 8k and 16k, H = 64 non-causal 8k), re-run with 10 timings per cell; 3. the features table's
# bias forward (0.998x tokamax in stop 37), re-run the same way.
set -uo pipefail
source benchmarks/gpu_env.sh
bash benchmarks/dev/stop42_call3.sh
for h in 128 64; do
    lengths="8192 16384"
    [ "$h" = 64 ] && lengths=8192
    timeout 110 python3 -m benchmarks.flash --head-dims "$h" --lengths $lengths --causal false \
        --modes fwd --peers jattn_mosaic cudnn tokamax_mosaic --repeats 10 \
        --json "$out/flash_h200_bf16_fwd_stop43_h${h}_noise.json" > "$out/fwd_h$h.txt" 2>&1
    grep -h '"ms"' "$out/fwd_h$h.txt" | cut -c1-150
done
timeout 80 python3 -m benchmarks.flash_features --features bias --modes fwd \
    --peers jattn_mosaic tokamax_mosaic --repeats 10 \
    --json "$out/flash_features_h200_stop43_bias.json" > "$out/features_bias.txt" 2>&1
tail -4 "$out/features_bias.txt" | cut -c1-200
