#!/usr/bin/env bash
# One device command (issue 19, stop 32): the Mosaic kernels that clean masked tiles' K and V.
# The -m gpu visibility and Mosaic tests, the A/B against the kernels without cleaning
# (`clean_hidden_ab.py`: causal and segment ids, 4k and 16k), then ptxas of the causal
# forward and backward (registers, spills: the producer's cleaning runs in 40 registers).
# From the repository root, .whl carried; about 9 minutes.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 150 python3 -m pytest -m gpu -q tests/test_visibility.py 2>&1 | tail -3
timeout 200 python3 -m pytest -m gpu -q -x tests/test_flash_mosaic.py 2>&1 | tail -4
timeout 180 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/clean_ab.json" \
    --cells causal segments 2>&1 | grep '^{' | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r['cell'], r['length'], r['mode'], r['peer'], round(r['ms'], 3) if 'ms' in r else r.get('error'))"
MOSAIC_GPU_DUMP_PTXAS=1 timeout 50 python3 -m benchmarks.dev.mosaic_one_call --variant base \
    --causal --grad --length 4096 --calls 0 > "$out/ptxas.txt" 2>&1
grep -iE "spill|registers|error" "$out/ptxas.txt" | sort | uniq -c | head -20
