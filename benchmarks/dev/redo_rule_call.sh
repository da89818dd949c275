#!/usr/bin/env bash
# One device command (issue 14, stop 39): the forward's redo on by default wherever its second
# pass fits registers (`flash_mosaic.redo_defaults`: now also H = 256, and H = 64 on 64 x 128
# score tiles, the H200 table's causal <= 1k tiles). 1. The -m gpu redo cases (a new one at
# H = 256). 2. The causal forward rows that the rule changes: H = 256 at 512-16k, H = 64 at
# 512-4k, beside cuDNN and tokamax. From the repository root, .whl carried (about 5 minutes):
#   bash benchmarks/dev/redo_rule_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 170 python3 -m pytest -q -o addopts="-ra" -p no:cacheprovider -m gpu \
    tests/test_visibility.py -k redo > "$out/tests_redo.txt" 2>&1
tail -3 "$out/tests_redo.txt"
row() {  # head dim, json name, lengths...: one causal forward row, three peers
    local head_dim=$1 name=$2
    shift 2
    timeout 130 python3 -m benchmarks.flash --head-dims "$head_dim" --lengths "$@" \
        --causal true --modes fwd --peers jattn_mosaic cudnn tokamax_mosaic \
        --json "$out/$name.json" > "$out/$name.txt" 2>&1
    grep -h '"ms"' "$out/$name.txt" | cut -c1-150
}
row 256 flash_h200_h256_causal_fwd_stop39 512 1024 2048 4096 8192 16384
row 64 flash_h200_h64_causal_fwd_stop39 512 1024 2048 4096
