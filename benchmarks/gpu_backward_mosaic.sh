#!/usr/bin/env bash
# One device command for the Mosaic GPU backward (issue 14): its -m gpu tests, ptxas's report
# per backward variant (registers, spills), then forward+backward of the variants beside cuDNN
# and tokamax (mosaic_variants). Every step's output is kept under $OUT. From the repository
# root, with .whl carried (about 8 minutes with the defaults):
#   bash benchmarks/gpu_backward_mosaic.sh
#   VARIANTS="base bwd_fused" HEAD_DIMS="128" LENGTHS="4096 16384" bash benchmarks/gpu_backward_mosaic.sh
set -uo pipefail
source benchmarks/gpu_env.sh
variants=${VARIANTS:-base bwd_fused}
timeout "${TEST_SECONDS:-150}" python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider \
    -n 4 -q tests/test_flash_mosaic.py -k "${TESTS:-backward or fused}" > "$out/gpu_tests.txt" 2>&1
tail -3 "$out/gpu_tests.txt"; grep -E "^(FAILED|ERROR)" "$out/gpu_tests.txt" | head
for head_dim in ${PTXAS_HEAD_DIMS:-128 256}; do
    for variant in $variants; do
        log="$out/ptxas_${variant}_h$head_dim.txt"
        MOSAIC_GPU_DUMP_PTXAS=1 timeout 100 python3 -m benchmarks.dev.mosaic_one_call \
            --variant "$variant" --head-dim "$head_dim" --grad --calls 0 > "$log" 2>&1
        echo "== ptxas $variant H=$head_dim"; grep -E "Used|spill|C75" "$log" | head -8
    done
done
# shellcheck disable=SC2086  # word splitting of the lists is wanted
timeout "${BENCH_SECONDS:-330}" python3 -m benchmarks.mosaic_variants --json "$out/bwd_variants.json" \
    --head-dims ${HEAD_DIMS:-64 128 256} --lengths ${LENGTHS:-1024 4096 16384} \
    --variants $variants --mode fwd+bwd --skip-check 2>&1 | grep '"peer"' | cut -c1-160
