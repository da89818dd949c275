#!/usr/bin/env bash
# One device command (issue 14, stop 33): `COOPERATIVE_DQ` at H = 64 (H = 128 ran in
# ab_rerun_call.sh), then the cleaning's cost split between flag_nonfinite's reads and the
# kernels' structure (`clean_hidden_ab.py`'s clean_unflagged), causal, 4k and 16k.
set -uo pipefail
source benchmarks/gpu_env.sh
show='import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(*(r.get(k) for k in ("cell", "head_dim", "length", "causal", "mode", "peer")),
          round(r["ms"], 3) if "ms" in r else r.get("error"))'
timeout 200 python3 -m benchmarks.dev.fused_dq_ab --json "$out/cooperative_ab_h64.json" \
    --head-dims 64 --switch COOPERATIVE_DQ --values 128 0 2>&1 | grep '^{' \
    | python3 -c "$show"
timeout 150 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/clean_split.json" \
    --cells causal 2>&1 | grep '^{' | python3 -c "$show"
