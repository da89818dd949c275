#!/usr/bin/env bash
# One device command for flex_attention (issue 16): its -m gpu tests (the Mosaic path's forward
# and backward, block-mask lists included, against the float64 oracle; and the Mosaic kernels
# compiled under x64, issue 19; the plain kernels' segment cases), then the flex benchmark
# beside the native kernels, cuDNN, XLA and tokamax (JSON saved row by row). Every step's output
# is kept under $OUT. From the repository root, with .whl carried (about 7 minutes):
#   bash benchmarks/gpu_flex.sh
#   LENGTHS="4096" bash benchmarks/gpu_flex.sh
set -uo pipefail
source benchmarks/gpu_env.sh
timeout "${TEST_SECONDS:-200}" python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider \
    -n 4 -q tests/test_flex.py tests/test_x64_autodiff.py > "$out/flex_tests.txt" 2>&1
tail -3 "$out/flex_tests.txt"; grep -E "^(FAILED|ERROR)" "$out/flex_tests.txt" | head
# the plain kernels' segment ids: unmasked tiles load no key ids since stop 28 (`segments_read`)
timeout 150 python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -n 4 -q \
    tests/test_flash_mosaic.py -k "every_feature and segment" > "$out/segments_tests.txt" 2>&1
tail -1 "$out/segments_tests.txt"; grep -E "^(FAILED|ERROR)" "$out/segments_tests.txt" | head
# shellcheck disable=SC2086  # word splitting of the list is wanted
timeout "${BENCH_SECONDS:-330}" python3 -m benchmarks.flex --json "$out/flex.json" \
    --lengths ${LENGTHS:-4096 8192} --block-mask-lengths 16384 > "$out/flex_bench.txt" 2>&1
grep "^{'variant'" "$out/flex_bench.txt" | cut -c1-150
