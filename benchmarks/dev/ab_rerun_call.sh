#!/usr/bin/env bash
# One device command (issues 19 and 14, stop 33): the in-process A/Bs of module switches, each
# setting compiled with JAX's caches cleared (before stop 33 every setting ran the first one's
# kernels): `CLEAN_HIDDEN` (the masked tiles' cleaning; clean_unflagged: without
# `flag_nonfinite`'s reads) on CLEAN_CELLS, and `COOPERATIVE_DQ` (the fused dQ split: 128 = the
# consumers meet at every width, 0 = never) at HEAD_DIMS. About 3 minutes per head dim and
# 2 per cell. The fused kernel's parts: `FUSED_DQ_OMIT` in `fused_dq_parts.sh`.
set -uo pipefail
source benchmarks/gpu_env.sh
show='import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(*(r.get(k) for k in ("cell", "head_dim", "length", "causal", "mode", "peer")),
          round(r["ms"], 3) if "ms" in r else r.get("error"))'
timeout 300 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/clean_ab.json" \
    --cells ${CLEAN_CELLS:-causal segments} 2>&1 | grep '^{' | python3 -c "$show"
timeout 300 python3 -m benchmarks.dev.fused_dq_ab --json "$out/cooperative_ab.json" \
    --head-dims ${HEAD_DIMS:-128 64} --switch COOPERATIVE_DQ --values 128 0 2>&1 \
    | grep '^{' | python3 -c "$show"
