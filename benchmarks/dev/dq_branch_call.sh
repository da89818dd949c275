#!/usr/bin/env bash
# One device command (issue 19 follow-up, stop 33, about 3 minutes): the dq kernel that
# branches once per program on the batch row's NONFINITE flag. The -m gpu visibility cases,
# then forward+backward of the causal cell beside the kernels without cleaning.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 100 python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -n 6 -q \
    tests/test_visibility.py 2>&1 | tail -2
timeout 110 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/dq_branch.json" \
    --cells causal --modes fwd+bwd --repeats 7 2>&1 | grep '^{' | python3 -c 'import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r["cell"], r["length"], r["mode"], r["peer"], round(r["ms"], 3) if "ms" in r else "-")'
