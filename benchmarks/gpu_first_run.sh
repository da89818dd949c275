#!/usr/bin/env bash
# The first GPU run of the Mosaic GPU kernel (issue 4) and the unverified Triton GPU tests
# (issue 3), in one device command that fits 600 s. From the repository root, with the wheels
# in .whl (bash ../shared/gpu/fetch_wheels.sh .whl) carried along:
#   bash benchmarks/gpu_first_run.sh            # writes under $OUT (or ./gpu_out)
# 1. the -m gpu tests of both kernels and of dispatch (output kept even if cut off);
# 2. a small side-by-side at H=128 (jattn_mosaic, cudnn, tokamax_mosaic, jattn_triton).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && cp -r .whl/stub/xprof /tmp/site/
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/device.txt"
timeout 300 python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -p no:benchmark -n 4 \
    -v tests/test_flash_mosaic.py tests/test_gpu.py tests/test_flash_triton.py 2>&1 \
    | tee "$out/gpu_tests.txt" | tail -40
timeout 240 python3 -m benchmarks.flash --head-dims 128 --lengths 4096 16384 \
    --peers jattn_mosaic cudnn tokamax_mosaic jattn_triton --repeats 5 --verbose \
    --json "$out/flash_mosaic_h128.json" 2>&1 | tail -30
