#!/usr/bin/env bash
# Stop 46: call 3's five Triton failures were the test's fixed lse tolerance (atol 0.02 on an
# lse the API returns in bfloat16, which rounds an lse in [8, 16) by up to 0.031). The oracle
# checks now share one lse tolerance (`cases.lse_tolerance`: the dtype's, absolute plus
# relative), tighter than the old max|lse|-scaled one, so every -m gpu case that compares an
# lse runs again: both kernels' files and test_flex, on 8 pytest workers.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 340 python3 -m pytest -o addopts="-ra" -p no:cacheprovider -m gpu -n 8 \
    --dist worksteal --timeout 150 -v --durations=10 \
    tests/test_flash_triton.py tests/test_flash_mosaic.py tests/test_flex.py \
    > "$out/tests_lse.txt" 2>&1
echo "rc $?"; grep -c PASSED "$out/tests_lse.txt"
grep -E "FAILED|ERROR|Timeout" "$out/tests_lse.txt" | head -20; tail -2 "$out/tests_lse.txt"
