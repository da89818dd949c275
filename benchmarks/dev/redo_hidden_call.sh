#!/usr/bin/env bash
# One device command (issue 14, written in stop 37 for the next session): is
# `MosaicConfig.redo_hidden` (no flag read in XLA; a consumer whose rows went non-finite redoes
# its tiles with the cleaning; its marks flag V for the backward) as fast as the kernels
# without any cleaning ("dirty"), and right? 1. The -m gpu redo cases of test_visibility (the
# consumers' own loads and second pass, compiled). 2. The A/B in one process
# (`clean_hidden_ab`: dirty / clean / redo / cuDNN) at H = 128 (causal 1k-16k, segment ids 4k)
# and H = 64 (causal, forward). 3. ptxas's registers and spills of the causal H = 128 forward
# with and without it. From the repository root, .whl carried (about 9 minutes):
#   bash benchmarks/dev/redo_hidden_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
redo_gpu_tests
ab redo_ab h128_causal 170 --lengths 1024 4096 16384 --cells causal
ab redo_ab h128_segments 70 --lengths 4096 --cells segments
ab redo_ab h64_causal 80 --head-dim 64 --lengths 1024 16384 --cells causal --modes fwd
for variant in clean_hidden redo_hidden; do  # (stop 37-38: "base" then had no redo)
    echo "== ptxas $variant"
    MOSAIC_GPU_DUMP_PTXAS=1 timeout 40 python3 -m benchmarks.dev.mosaic_one_call --causal \
        --variant $variant --calls 0 > "$out/ptxas_$variant.txt" 2>&1
    grep -iE "spill|registers" "$out/ptxas_$variant.txt" | sort | uniq -c | head -6
done
