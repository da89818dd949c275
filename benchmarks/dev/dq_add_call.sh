#!/usr/bin/env bash
# One device command (issue 14): how the fused-dQ backward adds its dQ chunks to global memory
# (`flash_mosaic_bwd.DQ_ADD`: "tma", "tma_plain", "atomic"). The -m gpu tests of the Mosaic
# kernels and the visibility cases (default setting), the fused cases under each other setting,
# then the A/B in one process (`fused_dq_ab.py`) beside the two-kernel backward and cuDNN, then
# Nsight Compute of the fused dk/dv kernel under each setting (H = 128, T = 16k, non-causal).
set -uo pipefail
source benchmarks/gpu_env.sh
timeout "${TEST_SECONDS:-200}" python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider \
    -n 8 -q tests/test_visibility.py tests/test_flash_mosaic.py 2>&1 | tail -4
for value in ${VALUES:-atomic tma_plain}; do
    echo "== fused tests, DQ_ADD=$value"
    timeout 120 python3 - "$value" <<'PY' 2>&1 | tail -2
import sys
import pytest
from pallas_kernels import flash_mosaic_bwd
flash_mosaic_bwd.DQ_ADD = sys.argv[1]
sys.exit(pytest.main(["-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-k", "fused",
                      "tests/test_flash_mosaic.py", "tests/test_visibility.py"]))
PY
done
timeout "${AB_SECONDS:-300}" python3 -m benchmarks.dev.fused_dq_ab --json "$out/dq_add_ab.json" \
    --switch DQ_ADD --values tma ${VALUES:-atomic tma_plain} ${AB_ARGS:-} 2>&1 | grep -v "^ *$" \
    | tail -40
cat > /tmp/dq_add_one.py <<'PY'
import sys
from pallas_kernels import flash_mosaic_bwd
flash_mosaic_bwd.DQ_ADD = sys.argv[1]
from benchmarks.dev import mosaic_one_call
mosaic_one_call.main(sys.argv[2:])
PY
metrics=gpu__time_duration.sum,smsp__inst_executed.sum,launch__registers_per_thread
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
metrics=$metrics,lts__t_sectors_op_red.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum
for value in tma ${VALUES:-atomic tma_plain}; do
    echo "== ncu DQ_ADD=$value"
    timeout 100 ncu --clock-control none --metrics "$metrics" -k regex:dkdv \
        python3 /tmp/dq_add_one.py "$value" --variant bwd_fused --grad --calls 0 \
        > "$out/ncu_dq_add_$value.txt" 2>&1
    grep -E "duration|pct|inst_executed|registers|sectors|conflicts|rror" \
        "$out/ncu_dq_add_$value.txt" | sed -E 's/  +/ /g'
done
