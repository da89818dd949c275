#!/usr/bin/env bash
# Stop 39's last device command (about 4 minutes): the shipped forward configs' -m gpu oracle
# cases that call 4 did not reach (H = 128 causal, H = 256; the redo now on at H = 256), then
# the features table's q_offset row.
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 105 python3 -m pytest -q -o addopts="-ra" -p no:cacheprovider -m gpu \
    tests/test_flash_mosaic.py -k "every_shipped_forward_config and not 64" \
    > "$out/tests_shipped.txt" 2>&1
tail -3 "$out/tests_shipped.txt"
timeout 100 python3 -m benchmarks.flash_features --features q_offset \
    --json "$out/flash_features_h200_stop39_q_offset.json" > "$out/features.txt" 2>&1
grep -h '"ms"' "$out/features.txt" | cut -c1-120
