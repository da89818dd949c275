#!/usr/bin/env bash
# Stop 42's third device command (issue 14), about 3 minutes: where H = 64's forward+backward
# time goes against cuDNN's (its cells trail cuDNN 0.88-0.98x from 2k): Nsight Compute per kernel
# at T = 16k (B = 1, N = 32), non-causal and causal, jattn mosaic and cuDNN (kernels serialized,
# clocks not locked; `benchmarks/dev/backward_ncu.sh` did H = 128 in stop 32).
set -uo pipefail
source benchmarks/gpu_env.sh
metrics=gpu__time_duration.sum,launch__registers_per_thread,smsp__inst_executed.sum
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for causal in "" --causal; do
    for variant in jattn_mosaic cudnn; do
        echo "== $variant $causal"
        timeout 70 ncu --clock-control none --metrics "$metrics" \
            -k regex:'mosaic|cudnn|dot_do_o|convert_dq' \
            python3 -m benchmarks.dev.mosaic_one_call --variant "$variant" --head-dim 64 \
            --grad --calls 0 $causal > "$out/ncu_h64_${variant}${causal}.txt" 2>&1
        grep -E "^  [a-zA-Z_].*\(|duration|pct" "$out/ncu_h64_${variant}${causal}.txt" \
            | sed -E 's/\(const void.*\) \(/(/; s/  +/ /g'
    done
done
