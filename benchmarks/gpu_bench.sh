#!/usr/bin/env bash
# One device command of the flash benchmark (jattn mosaic, cuDNN, tokamax mosaic; bf16 unless
# DTYPE is set), for the head dims given, writing $OUT/flash_<tag>.json; EXTRA, if set, is run
# after it (for example the graph benchmark). From the repository root, with .whl carried:
#   TAG=h128 bash benchmarks/gpu_bench.sh 128
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && cp -r .whl/stub/xprof /tmp/site/
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout "${BENCH_SECONDS:-420}" python3 -m benchmarks.flash --head-dims "$@" \
    --lengths ${LENGTHS:-512 1024 2048 4096 8192 16384} --dtype "${DTYPE:-bfloat16}" \
    --peers jattn_mosaic cudnn tokamax_mosaic --repeats 5 \
    --json "$out/flash_${TAG:-run}.json" 2>&1 | grep -v Warning | tail -15
if [ -n "${EXTRA:-}" ]; then eval "$EXTRA"; fi
