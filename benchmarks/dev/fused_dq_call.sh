#!/usr/bin/env bash
# One device command (issue 14): the fused-dQ backward with the consumers' dQ split (stop 32):
# its -m gpu tests, then forward+backward beside the two-kernel backward, cuDNN and tokamax
# (H = 64 and 128; T = 4k and 16k; causal and not), then Nsight Compute of its kernel with and
# without the dQ store (`fused_dq_parts.sh`'s switch) at H = 128, T = 16k.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 150 python3 -m pytest -m gpu -q -x tests/test_flash_mosaic.py -k fused 2>&1 | tail -3
timeout 240 python3 -m benchmarks.mosaic_variants --mode fwd+bwd --variants base bwd_fused \
    --head-dims 128 64 --lengths 16384 4096 --skip-check --json "$out/v.json" 2>&1 \
    | grep '^{' | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r['head_dim'], r['length'], r['causal'], r['peer'], round(r.get('ms', -1), 3), round(r.get('tflops', 0)), r.get('error', '')[:200])"
cat > /tmp/fused_parts.py <<'PY'
import sys
from pallas_kernels import flash_mosaic_bwd
flash_mosaic_bwd.FUSED_DQ_OMIT = frozenset(filter(None, sys.argv[1].split(",")))
from benchmarks.dev import mosaic_one_call
mosaic_one_call.main(sys.argv[2:])
PY
metrics=gpu__time_duration.sum,smsp__inst_executed.sum,smsp__inst_executed_pipe_alu.sum
metrics=$metrics,smsp__inst_executed_pipe_lsu.sum,launch__registers_per_thread
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for omit in none store; do
    echo "== omit: $omit"
    timeout 100 ncu --clock-control none --metrics "$metrics" -k regex:dkdv \
        python3 /tmp/fused_parts.py "${omit/none/}" --variant bwd_fused --grad --calls 0 \
        > "$out/ncu_fused_$omit.txt" 2>&1
    grep -E "duration|pct|inst_executed|registers|rror" "$out/ncu_fused_$omit.txt" | sed -E 's/  +/ /g'
done
