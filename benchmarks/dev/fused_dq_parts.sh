#!/usr/bin/env bash
# One device command (issue 14): where the fused-dQ backward's time goes (H = 128, T = 16k,
# B = 1, N = 16, bf16, non-causal unless CAUSAL=1). Nsight Compute times the dk/dv kernel with
# `flash_mosaic_bwd.FUSED_DQ_OMIT` leaving out the dQ store ("store") or the whole dS @ K
# ("store,mma"), or the list OMITS ("none" for nothing; stop 33: "tma", the reduce-add alone);
# the differences are those stages' cost. Then the SASS opcode and stall mix of the whole fused
# kernel beside the two-kernel backward's dk/dv kernel (wrong dQ when a stage is
# omitted: timing only). From the repository root, with .whl carried (about 3 minutes).
set -uo pipefail
source benchmarks/gpu_env.sh
causal=${CAUSAL:+--causal}
cat > /tmp/fused_parts.py <<'PY'
import sys
from pallas_kernels import flash_mosaic_bwd
flash_mosaic_bwd.FUSED_DQ_OMIT = frozenset(filter(None, sys.argv[1].split(",")))
from benchmarks.dev import mosaic_one_call
mosaic_one_call.main(sys.argv[2:])
PY
metrics=gpu__time_duration.sum,smsp__inst_executed.sum,smsp__inst_executed_pipe_alu.sum
metrics=$metrics,smsp__inst_executed_pipe_lsu.sum,smsp__inst_executed_pipe_fma.sum
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for omit in ${OMITS:-none store store,mma}; do
    omit=${omit/#none/}
    echo "== omit: ${omit:-nothing}"
    timeout 120 ncu --clock-control none --metrics "$metrics" -k regex:dkdv \
        python3 /tmp/fused_parts.py "$omit" --variant bwd_fused --grad --calls 0 $causal \
        > "$out/ncu_fused_${omit:-none}.txt" 2>&1
    grep -E "duration|pct|inst_executed|rror" "$out/ncu_fused_${omit:-none}.txt" | sed -E 's/  +/ /g'
done
for variant in bwd_fused base; do
    timeout 150 ncu --clock-control none --section SourceCounters --page source \
        --print-source sass --csv -k regex:'body_mosaic|dkdv' --launch-count 1 \
        python3 -m benchmarks.dev.mosaic_one_call --variant "$variant" --grad --calls 0 $causal \
        > "$out/sass_$variant.csv" 2>&1
done
python3 -m benchmarks.dev.sass_mix "$out/sass_bwd_fused.csv" "$out/sass_base.csv" \
    --per $((16384 * 16384 * 16)) --top 40
