#!/usr/bin/env bash
# One device command (issue 14): where the Mosaic backward's time goes against cuDNN's, at
# H = 128, T = 16k (flash.py's shapes: B = 1, N = 16), forward+backward of one call. Per kernel
# (jattn's forward, dq and dk/dv kernels; cuDNN's): time, instructions by pipe, tensor-pipe
# activity, registers; then the SASS source page of the dk/dv kernel and its opcode and stall mix
# (`benchmarks/dev/sass_mix.py`, per score-tile element). From the repository root, with .whl
# carried (about 3 minutes):
#   bash benchmarks/dev/backward_ncu.sh              # CAUSAL=1 for the causal case
set -uo pipefail
source benchmarks/gpu_env.sh
causal=${CAUSAL:+--causal}
metrics=gpu__time_duration.sum,launch__registers_per_thread,smsp__inst_executed.sum
metrics=$metrics,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_fma.sum
metrics=$metrics,smsp__inst_executed_pipe_xu.sum,smsp__inst_executed_pipe_lsu.sum
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for variant in base cudnn; do
    echo "== $variant"
    timeout 150 ncu --clock-control none --metrics "$metrics" python3 -m benchmarks.dev.mosaic_one_call \
        --variant "$variant" --grad --calls 0 $causal > "$out/ncu_bwd_$variant.txt" 2>&1
    grep -vE "^==PROF|Warning" "$out/ncu_bwd_$variant.txt" | grep -E "^  [a-zA-Z_].*\(|sum|pct|thread" | head -80
done
timeout 150 ncu --clock-control none --section SourceCounters --page source --print-source sass --csv \
    -k regex:dkdv python3 -m benchmarks.dev.mosaic_one_call --variant base --grad --calls 0 $causal \
    > "$out/sass_dkdv.csv" 2>&1
python3 -m benchmarks.dev.sass_mix "$out/sass_dkdv.csv" --per $((16384 * 16384 * 16)) --top 30
