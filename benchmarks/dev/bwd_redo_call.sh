#!/usr/bin/env bash
# One device command (issue 14, stop 38): `MosaicConfig.bwd_redo_hidden` (the dq kernel runs
# without the cleaning and reads no flag; a consumer whose dQ went non-finite redoes its tiles
# cleaned), against stop 37's forward redo alone, the cleaning and no cleaning at all. 1. The
# -m gpu redo cases of test_visibility (forward and dq redo, compiled). 2. Forward+backward A/B
# in one process per head dim (`clean_hidden_ab`): H = 128 causal 1k/4k/16k and segment ids 4k;
# H = 64 causal 16k, forward too (stop 37's redo lost 13% there). 3. ptxas of the H = 64 causal
# forward with and without redo_hidden (spills?). From the repository root, .whl carried:
#   bash benchmarks/dev/bwd_redo_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
redo_gpu_tests
ab bwd_redo_ab h128_causal 150 --lengths 1024 4096 16384 --cells causal --modes fwd+bwd
ab bwd_redo_ab h128_segments 60 --lengths 4096 --cells segments --modes fwd+bwd --settings dirty clean redo redo_bwd
ab bwd_redo_ab h64_causal 100 --head-dim 64 --lengths 16384 --cells causal --settings clean redo redo_bwd cudnn
for variant in clean_hidden redo_hidden; do  # (stop 37-38: "base" then had no redo)
    echo "== ptxas H64 $variant"
    MOSAIC_GPU_DUMP_PTXAS=1 timeout 40 python3 -m benchmarks.dev.mosaic_one_call --causal \
        --head-dim 64 --variant $variant --calls 0 > "$out/ptxas_h64_$variant.txt" 2>&1
    grep -iE "spill|registers" "$out/ptxas_h64_$variant.txt" | sort | uniq -c | head -6
done
