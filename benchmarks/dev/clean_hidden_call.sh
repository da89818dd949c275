#!/usr/bin/env bash
# One device command (issue 19, stop 32): the Mosaic kernels that clean masked tiles' K and V.
# ptxas of the causal forward and backward (registers, spills: the producer's cleaning runs
# in 40 registers), the -m gpu visibility tests, the A/B against the kernels without cleaning
# (`clean_hidden_ab.py`), then the Mosaic -m gpu tests. From the repository root, .whl carried.
set -uo pipefail
source benchmarks/gpu_env.sh
MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 -m benchmarks.dev.mosaic_one_call --variant base \
    --causal --grad --length 4096 --calls 0 > "$out/ptxas.txt" 2>&1
grep -iE "spill|registers|error" "$out/ptxas.txt" | sort | uniq -c | head -20
timeout 200 python3 -m pytest -m gpu -q tests/test_visibility.py 2>&1 | tail -4
timeout 240 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/clean_ab.json" 2>&1 \
    | grep '^{' | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r['cell'], r['length'], r['mode'], r['peer'], round(r['ms'], 3) if 'ms' in r else r.get('error'))"
timeout 300 python3 -m pytest -m gpu -q tests/test_flash_mosaic.py 2>&1 | tail -6
