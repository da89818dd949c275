#!/usr/bin/env bash
# Stop 43's third device command (issue 14), about 4 minutes: where the H = 64 backward kernels'
# time goes (T = 16k, B = 1, N = 32, non-causal; they ran at 60% and 67% tensor-pipe activity in
# call 1): Nsight Compute's SASS source page of jattn's dk/dv kernel (the first backward launch),
# its dq kernel (the second) and cuDNN's backward kernel, then their opcode and stall mixes per
# score element side by side (`benchmarks/dev/sass_mix.py`).
set -uo pipefail
source benchmarks/gpu_env.sh
page() {  # name, kernel regex, launches to skip, variant
    timeout 120 ncu --clock-control none --section SourceCounters --page source \
        --print-source sass --csv -k regex:"$2" --launch-skip "$3" --launch-count 1 \
        python3 -m benchmarks.dev.mosaic_one_call --variant "$4" --head-dim 64 --grad --calls 0 \
        > "$out/sass_h64_$1.csv" 2>&1
    echo "$1: $(wc -l < "$out/sass_h64_$1.csv") lines"
}
page dkdv body_mosaic 0 jattn_mosaic
page dq body_mosaic 1 jattn_mosaic
page cudnn_bprop bprop 0 cudnn
python3 -m benchmarks.dev.sass_mix "$out"/sass_h64_{dkdv,dq,cudnn_bprop}.csv \
    --per $((16384 * 16384 * 32)) --top 30 | tee "$out/sass_mix_h64.md"
