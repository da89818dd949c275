#!/usr/bin/env bash
# One device command (issue 14, stop 39), after the H = 64 causal T <= 4096 retune (64 x 128
# tiles with the forward's redo) and the dispatch rebuild: 1. the -m gpu check of every shipped
# forward config against the oracle; 2. the H = 64 causal forward at 2k and 4k on the new
# entry; 3. the rest of the features table (call 3 was cut after the window forward); 4. the
# auto check: jattn auto against cuDNN and tokamax, forward, H 64/128/256 x T 1k/4k/16k.
# From the repository root, .whl carried (about 9 minutes):
#   bash benchmarks/dev/auto_check_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 100 python3 -m pytest -q -o addopts="-ra" -p no:cacheprovider -m gpu \
    tests/test_flash_mosaic.py -k every_shipped_forward_config > "$out/tests_shipped.txt" 2>&1
tail -3 "$out/tests_shipped.txt"
timeout 50 python3 -m benchmarks.flash --head-dims 64 --lengths 2048 4096 --causal true \
    --modes fwd --peers jattn_mosaic cudnn tokamax_mosaic \
    --json "$out/flash_h200_h64_causal_fwd_retune_stop39.json" > "$out/h64.txt" 2>&1
grep -h '"ms"' "$out/h64.txt" | cut -c1-150
timeout 200 python3 -m benchmarks.flash_features --features window gqa_8_to_1 q_offset bias \
    --json "$out/flash_features_h200_stop39_rest.json" > "$out/features.txt" 2>&1
grep -h '"ms"' "$out/features.txt" | cut -c1-120
timeout 170 python3 -m benchmarks.flash --head-dims 64 128 256 --lengths 1024 4096 16384 \
    --modes fwd --peers jattn_auto cudnn tokamax_mosaic \
    --json "$out/flash_h200_auto_check_fwd_stop39.json" > "$out/auto.txt" 2>&1
grep -h '"ms"' "$out/auto.txt" | cut -c1-150
