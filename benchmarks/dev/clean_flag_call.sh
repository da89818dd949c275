#!/usr/bin/env bash
# One device command (issue 19 follow-up, stop 33): the Mosaic kernels clean masked tiles only
# in batch rows whose K or V hold a NaN or an inf (`mosaic_common.flag_nonfinite`). The -m gpu
# tests of the Mosaic kernels, the visibility cases and flex, then the A/B against the kernels
# without cleaning (`clean_hidden_ab.py`, finite inputs: causal and segment ids, 4k and 16k).
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 240 python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -n 8 -q \
    tests/test_visibility.py tests/test_flash_mosaic.py tests/test_flex.py 2>&1 | tail -4
timeout 200 python3 -m benchmarks.dev.clean_hidden_ab --json "$out/clean_ab.json" \
    --cells causal segments 2>&1 | grep '^{' | python3 -c 'import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r["cell"], r["length"], r["mode"], r["peer"], round(r["ms"], 3) if "ms" in r else "-")'
