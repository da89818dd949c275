#!/usr/bin/env bash
# One device command (issue 14, stop 36): `mosaic_common.launch_by_flag`'s lax.cond between the
# Mosaic kernels with and without the masked tiles' cleaning, checked and timed. First a GPU
# visibility case on the branch (a NaN input runs the cleaning kernels), then the A/B
# (`clean_hidden_ab`: dirty / in_kernel / branched / cuDNN, H = 128 and H = 64, with compile
# times), then the -m gpu tests of test_flash_mosaic.py selected by TESTS_K (default: the fused
# backward under jax.vmap). From the repository root,
# .whl carried (about 9 minutes):  bash benchmarks/dev/branch_on_flag_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 90 python3 -m pytest -q -o addopts="-ra" -p no:cacheprovider -n 8 -m gpu tests/test_visibility.py \
    > "$out/tests_visibility.txt" 2>&1; tail -3 "$out/tests_visibility.txt"
timeout 240 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/branch_ab_h128.json" \
    --lengths 4096 16384 --cells causal segments --repeats 7 > "$out/ab_h128.txt" 2>&1
tail -2 "$out/ab_h128.txt"
timeout 120 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/branch_ab_h64.json" \
    --head-dim 64 --lengths 2048 16384 --cells causal --repeats 7 > "$out/ab_h64.txt" 2>&1
tail -2 "$out/ab_h64.txt"
timeout 90 python3 -m pytest -q -o addopts="-ra" -p no:cacheprovider -n 8 -m gpu \
    tests/test_flash_mosaic.py -k "${TESTS_K:-vmap}" > "$out/tests_mosaic.txt" 2>&1
tail -3 "$out/tests_mosaic.txt"
