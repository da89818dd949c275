#!/usr/bin/env bash
# One device command (issue 14, stop 38): the causal rows of the README's H200 tables again,
# with redo_hidden / bwd_redo_hidden on by default (`flash_mosaic.redo_defaults`): H = 128
# forward and forward+backward, H = 64 forward+backward (its forward is unchanged), T = 512-16k,
# jattn mosaic / cuDNN / tokamax mosaic. From the repository root, .whl carried (about 7 min):
#   bash benchmarks/dev/redo_tables_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
peers="jattn_mosaic cudnn tokamax_mosaic"
timeout 270 python3 -m benchmarks.flash --head-dims 128 --causal true --modes fwd fwd+bwd \
    --peers $peers --json "$out/flash_h200_causal_h128_stop38.json" > "$out/h128.txt" 2>&1
grep -h '"tflops"' "$out/h128.txt" | cut -c1-150
timeout 170 python3 -m benchmarks.flash --head-dims 64 --causal true --modes fwd+bwd \
    --peers $peers --json "$out/flash_h200_causal_h64_fwdbwd_stop38.json" > "$out/h64.txt" 2>&1
grep -h '"tflops"' "$out/h64.txt" | cut -c1-150
