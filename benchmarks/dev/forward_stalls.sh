#!/usr/bin/env bash
# One device command (issue 14): why jattn's forward keeps the tensor pipe busy 70% of the time
# where cuDNN's does 77% (stop 32, H = 128, T = 16k, non-causal, same instruction count). Per
# peer (VARIANTS: mosaic_variants names or flash.PEERS names), Nsight Compute's time, tensor-pipe
# activity and the per-issue stall ratios of every reason on one forward; then the SASS source
# page of jattn's and tokamax's kernels with their opcode and stall-sample mix side by side
# (`sass_mix.py`, per score element). From the repository root, .whl carried (about 3 minutes):
#   VARIANTS="overlap cudnn tokamax_mosaic" bash benchmarks/dev/forward_stalls.sh   # CAUSAL=1
set -uo pipefail
source benchmarks/gpu_env.sh
causal=${CAUSAL:+--causal}
length=${LENGTH:-16384}
halve=${CAUSAL:+2}  # score elements: B * N * T * T (B = 16k / T, N = 16), halved when causal
halve=${halve:-1}
kernels='regex:jattn_flash_forward|flash_attention|cudnn'
metrics=gpu__time_duration.sum,smsp__inst_executed.sum,launch__registers_per_thread,launch__grid_size
metrics=$metrics,sm__cycles_active.avg,sm__cycles_elapsed.avg
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
metrics=$metrics,smsp__average_warp_latency_per_inst_issued.ratio
metrics=$metrics,"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
for variant in ${VARIANTS:-overlap cudnn tokamax_mosaic}; do
    echo "== $variant"
    timeout 120 ncu --clock-control none --metrics "$metrics" -k "$kernels" --launch-count 1 \
        python3 -m benchmarks.dev.mosaic_one_call --variant "$variant" --calls 0 \
        --length "$length" $causal > "$out/stalls_$variant.txt" 2>&1
    grep -E "^  [a-zA-Z_].*\(|duration|registers|grid_size|cycles_|pct|inst_executed|ratio" \
        "$out/stalls_$variant.txt" | sed -E 's/\(const void.*\) \(/(/; s/  +/ /g' \
        | awk '!/ratio/ || $NF+0 >= 0.05'
done
csvs=()
for variant in ${SASS_VARIANTS:-overlap tokamax_mosaic}; do
    timeout 150 ncu --clock-control none --section SourceCounters --page source \
        --print-source sass --csv -k "$kernels" --launch-count 1 \
        python3 -m benchmarks.dev.mosaic_one_call --variant "$variant" --calls 0 \
        --length "$length" $causal > "$out/sass_fwd_$variant.csv" 2>&1
    csvs+=("$out/sass_fwd_$variant.csv")
done
python3 -m benchmarks.dev.sass_mix "${csvs[@]}" --per $((16384 * length * 16 / halve)) --top 30
