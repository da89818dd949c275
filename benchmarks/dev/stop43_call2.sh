#!/usr/bin/env bash
# Stop 43's second device command (issue 14), about 8 minutes: the backward's consumers taking
# turns (flash_mosaic_bwd.BACKWARD_TURNS): 1. its -m gpu cases against the oracle; 2. an A/B in
# one process beside cuDNN at H = 64 (no turns, dq kernel only, dk/dv kernel only, both) and at
# H = 128 (none, both), forward+backward.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests turns 120 tests/test_flash_mosaic.py -k taking_turns
timeout 250 python3 -m benchmarks.dev.switch_ab --switch BACKWARD_TURNS \
    --values "()" "('dq',)" "('dkdv',)" "('dq','dkdv')" --head-dims 64 --lengths 4096 16384 \
    --causal 0 1 --repeats 5 --json "$out/backward_turns_ab_h64.json" > "$out/ab_h64.txt" 2>&1
grep -h '"ms"\|error' "$out/ab_h64.txt" | cut -c1-400
timeout 130 python3 -m benchmarks.dev.switch_ab --switch BACKWARD_TURNS \
    --values "()" "('dq','dkdv')" --head-dims 128 --lengths 16384 \
    --causal 0 1 --repeats 5 --json "$out/backward_turns_ab_h128.json" > "$out/ab_h128.txt" 2>&1
grep -h '"ms"\|error' "$out/ab_h128.txt" | cut -c1-400
