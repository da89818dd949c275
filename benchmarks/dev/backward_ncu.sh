#!/usr/bin/env bash
# One device command (issue 14): where the Mosaic backward's time goes against cuDNN's, at
# H = 128, T = 16k (flash.py's shapes: B = 1, N = 16), forward+backward of one call. Per kernel
# (jattn's forward and backward kernels; cuDNN's): time, instructions by pipe, tensor-pipe
# activity, registers; then the SASS source page of the first backward kernel of each variant
# (the dk/dv kernel: it runs before the dq kernel) and their opcode and stall mix side by side
# (`benchmarks/dev/sass_mix.py`, per score-tile element). From the repository root, with .whl
# carried (about 1 minute per variant, and one for cuDNN):
#   VARIANTS="base bwd_fused" bash benchmarks/dev/backward_ncu.sh     # CAUSAL=1 for causal
set -uo pipefail
source benchmarks/gpu_env.sh
causal=${CAUSAL:+--causal}
variants=${VARIANTS:-base}
metrics=gpu__time_duration.sum,launch__registers_per_thread,smsp__inst_executed.sum
metrics=$metrics,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_fma.sum
metrics=$metrics,smsp__inst_executed_pipe_xu.sum,smsp__inst_executed_pipe_lsu.sum
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for variant in $variants cudnn; do
    echo "== $variant"
    timeout 150 ncu --clock-control none --metrics "$metrics" -k regex:'mosaic|cudnn|dot_do_o|convert_dq' \
        python3 -m benchmarks.dev.mosaic_one_call --variant "$variant" --grad --calls 0 $causal \
        > "$out/ncu_bwd_$variant.txt" 2>&1
    grep -E "^  [a-zA-Z_].*\(|duration|registers|pct|inst_executed" "$out/ncu_bwd_$variant.txt" \
        | sed -E 's/\(const void.*\) \(/(/; s/  +/ /g'
done
csvs=()
for variant in $variants; do
    timeout 150 ncu --clock-control none --section SourceCounters --page source \
        --print-source sass --csv -k regex:'body_mosaic|dkdv' --launch-count 1 \
        python3 -m benchmarks.dev.mosaic_one_call --variant "$variant" --grad --calls 0 $causal \
        > "$out/sass_$variant.csv" 2>&1
    csvs+=("$out/sass_$variant.csv")
done
python3 -m benchmarks.dev.sass_mix "${csvs[@]}" --per $((16384 * 16384 * 16)) --top 30
