#!/usr/bin/env bash
# One device command (issue 19's cost, for stop 34): where the 4-5% that `clean_hidden` adds to
# the causal forward+backward goes (H = 128, T = 16k, B = 1, N = 16; stop 33: not the dq
# kernel's per-step branches). Nsight Compute's time, registers and instructions of every
# Mosaic kernel of one forward+backward with and without the cleaning, then (unless
# PTXAS=0) ptxas's register and spill report of both. The -k filter matters: without it ncu
# also profiled XLA's autotuning, segfaulted and left the counters unusable for the rest of the
# call (stop 34). From the repository root, .whl carried (about 2 minutes).
set -uo pipefail
source benchmarks/gpu_env.sh
metrics=gpu__time_duration.sum,launch__registers_per_thread,smsp__inst_executed.sum
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for clean in "" --no-clean; do
    name=${clean:-clean}
    echo "== ${name#--}"
    timeout 150 ncu --clock-control none --metrics "$metrics" -k regex:"jattn|mosaic" \
        python3 -m benchmarks.dev.mosaic_one_call --causal --grad --calls 0 $clean \
        > "$out/ncu_${name#--}.txt" 2>&1
    grep -E "^  [a-zA-Z_].*\(|duration|registers|pct|inst_executed" "$out/ncu_${name#--}.txt" \
        | sed -E 's/\(const void.*\) \(/(/; s/  +/ /g'
    [ "${PTXAS:-1}" = 0 ] && continue
    MOSAIC_GPU_DUMP_PTXAS=1 timeout 60 python3 -m benchmarks.dev.mosaic_one_call --causal \
        --grad --calls 0 $clean > "$out/ptxas_${name#--}.txt" 2>&1
    grep -iE "spill|registers" "$out/ptxas_${name#--}.txt" | sort | uniq -c | head -12
done
