#!/usr/bin/env bash
# One device command of the flash benchmark (jattn mosaic, cuDNN, tokamax mosaic; bf16 unless
# DTYPE is set), for the head dims given, writing $OUT/flash_<tag>.json; EXTRA, if set, is run
# after it (for example the graph benchmark). From the repository root, with .whl carried:
#   TAG=h128 bash benchmarks/gpu_bench.sh 128
set -uo pipefail
source benchmarks/gpu_env.sh
timeout "${BENCH_SECONDS:-420}" python3 -m benchmarks.flash --head-dims "$@" \
    --lengths ${LENGTHS:-512 1024 2048 4096 8192 16384} --dtype "${DTYPE:-bfloat16}" \
    --peers jattn_mosaic cudnn tokamax_mosaic --repeats 5 \
    --json "$out/flash_${TAG:-run}.json" 2>&1 | grep -v Warning | tail -15
if [ -n "${EXTRA:-}" ]; then eval "$EXTRA"; fi
