#!/usr/bin/env bash
# Stop 42's first device command (issue 14), about 8 minutes: the H = 256 dq kernel on a
# two-stage ring of 32-key tiles (DQ_HALF_KEYS) against its one stage of 64 keys. 1. the -m gpu
# H = 256 backward cases; 2. forward+backward A/B beside cuDNN in one process (T 4k/16k, causal
# and not); 3. Nsight Compute per kernel (causal, T = 16k, B = 1, N = 8; kernels serialized,
# clocks not locked): the dq kernel's and the dk/dv kernel's time, before and after, and cuDNN's.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests h256 150 tests/test_flash_mosaic.py tests/test_visibility.py -k "head_dim_256_backward or (redo_hidden_masked_key_with_nan and 256)"
timeout 280 python3 -m benchmarks.dev.switch_ab --switch DQ_HALF_KEYS \
    --values False True --head-dims 256 --lengths 4096 16384 --causal 0 1 --repeats 5 \
    --json "$out/dq_half_keys_ab_h200.json" > "$out/ab.txt" 2>&1
grep -h '"ms"\|error' "$out/ab.txt" | cut -c1-60,150-260
tail -2 "$out/ab.txt"
metrics=gpu__time_duration.sum,launch__registers_per_thread,smsp__inst_executed.sum
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for half in False True; do
    echo "== DQ_HALF_KEYS=$half"
    timeout 80 ncu --clock-control none --metrics "$metrics" -k regex:'mosaic|dq|dkdv' \
        python3 -m benchmarks.dev.mosaic_one_call --head-dim 256 --causal --grad --calls 0 \
        --switch "DQ_HALF_KEYS=$half" > "$out/ncu_half_$half.txt" 2>&1
    grep -E "^  [a-zA-Z_].*\(|duration|registers|pct|inst_executed" "$out/ncu_half_$half.txt" \
        | sed -E 's/\(const void.*\) \(/(/; s/  +/ /g'
done
