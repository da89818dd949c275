#!/usr/bin/env bash
# One device command: the Mosaic GPU kernel's -m gpu tests (optional), then `jattn autotune` of
# the Mosaic kernel for the given head dims (bf16, both causal settings, T = 1k/4k/16k), with
# every candidate's time logged. From the repository root, with .whl carried:
#   TESTS=1 TUNE_SECONDS=330 bash benchmarks/gpu_tune_mosaic.sh 128      # writes under $OUT
set -uo pipefail
source benchmarks/gpu_env.sh
if [ "${TESTS:-0}" = 1 ]; then
    timeout "${TEST_SECONDS:-200}" python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider \
        -n 4 -q tests/test_flash_mosaic.py 2>&1 | tee "$out/gpu_tests_mosaic.txt" | tail -15
fi
timeout "${TUNE_SECONDS:-330}" python3 -m jattn.cli autotune --implementation mosaic \
    --head-dims "$@" --dtypes bfloat16 --lengths 1024 4096 16384 --no-progress \
    --cache "$out/autotune_mosaic.json" --log "$out/autotune_mosaic.jsonl" 2>&1 | tail -40
