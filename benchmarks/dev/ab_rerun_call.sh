#!/usr/bin/env bash
# One device command (issue 14, stop 33): the in-process A/Bs of module switches redone with
# JAX's caches cleared per setting (before, every setting ran the first one's kernels):
# `CLEAN_HIDDEN` (issue 19's cleaning) and `COOPERATIVE_DQ` (the fused dQ split); then Nsight
# Compute of the fused dk/dv kernel without its TMA reduce-add (`FUSED_DQ_OMIT=tma`: the store,
# fence and waits stay), H = 128, T = 16k, non-causal. About 6 minutes.
set -uo pipefail
source benchmarks/gpu_env.sh
show='import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(*(r.get(k) for k in ("cell", "head_dim", "length", "causal", "mode", "peer")),
          round(r["ms"], 3) if "ms" in r else r.get("error"))'
timeout 200 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/clean_ab.json" \
    --cells causal segments 2>&1 | grep '^{' | python3 -c "$show"
timeout 200 python3 -m benchmarks.dev.fused_dq_ab --json "$out/cooperative_ab.json" \
    --head-dims 128 --switch COOPERATIVE_DQ --values 128 0 2>&1 | grep '^{' \
    | python3 -c "$show"
cat > /tmp/fused_parts.py <<'PY'
import sys
from pallas_kernels import flash_mosaic_bwd
flash_mosaic_bwd.FUSED_DQ_OMIT = frozenset(filter(None, sys.argv[1].split(",")))
from benchmarks.dev import mosaic_one_call
mosaic_one_call.main(sys.argv[2:])
PY
metrics=gpu__time_duration.sum,smsp__inst_executed.sum,lts__t_sectors_op_red.sum
metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for omit in tma; do
    echo "== ncu omit $omit"
    timeout 100 ncu --clock-control none --metrics "$metrics" -k regex:dkdv \
        python3 /tmp/fused_parts.py "$omit" --variant bwd_fused --grad --calls 0 \
        > "$out/ncu_omit_$omit.txt" 2>&1
    grep -E "duration|pct|inst_executed|sectors|rror" "$out/ncu_omit_$omit.txt" | sed -E 's/  +/ /g'
done
