#!/usr/bin/env bash
# One device command (issue 14, written in stop 36 for the next session): is
# `mosaic_common.CHECK_IN_KERNEL` (no flag read in XLA; the producer checks each masked tile as
# it lands) cheaper than `flag_nonfinite`'s reads? 1. The A/B in one process (`clean_hidden_ab`:
# dirty / clean / checked / cuDNN) at H = 128 (causal, segment ids) and H = 64 (causal).
# 2. ptxas's registers and spills of the causal H = 128 forward+backward kernels with and
# without the check. 3. The -m gpu visibility cases with the check on (one process: the switch
# does not reach xdist's workers). From the repository root, .whl carried (about 8 minutes):
#   bash benchmarks/dev/check_in_kernel_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 250 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/check_ab_h128.json" \
    --lengths 1024 4096 16384 --cells causal segments --repeats 7 > "$out/ab_h128.txt" 2>&1
grep -h '"ms"' "$out/ab_h128.txt" | cut -c1-160
timeout 120 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/check_ab_h64.json" \
    --head-dim 64 --lengths 1024 16384 --cells causal --repeats 7 > "$out/ab_h64.txt" 2>&1
grep -h '"ms"' "$out/ab_h64.txt" | cut -c1-160
for check in "" --check-in-kernel; do
    echo "== ptxas ${check:-flag}"
    MOSAIC_GPU_DUMP_PTXAS=1 timeout 60 python3 -m benchmarks.dev.mosaic_one_call --causal \
        --grad --calls 0 $check > "$out/ptxas${check}.txt" 2>&1
    grep -iE "spill|registers" "$out/ptxas${check}.txt" | sort | uniq -c | head -12
done
timeout 120 python3 -c "
import sys, pytest
from pallas_kernels import mosaic_common
mosaic_common.CHECK_IN_KERNEL = True
sys.exit(pytest.main(['-q', '-o', 'addopts=-ra', '-p', 'no:cacheprovider', '-m', 'gpu',
                      'tests/test_visibility.py']))
" > "$out/tests_visibility_checked.txt" 2>&1
tail -2 "$out/tests_visibility_checked.txt"
