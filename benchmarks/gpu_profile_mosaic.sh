#!/usr/bin/env bash
# One device command: where the Mosaic GPU forward's time goes (issue 14). For each variant,
# ptxas's report (registers, spills, wgmma serialization warnings) from MOSAIC_GPU_DUMP_PTXAS,
# then Nsight Compute on one forward call of jattn and of tokamax at H=128 T=16k (clocks left
# alone, as the device notes ask). From the repository root, with .whl carried:
#   VARIANTS="base overlap" bash benchmarks/gpu_profile_mosaic.sh      # writes under $OUT
set -uo pipefail
source benchmarks/gpu_env.sh
for variant in ${VARIANTS:-base overlap}; do
    MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 -m benchmarks.dev.mosaic_one_call \
        --variant "$variant" --calls 0 > "$out/ptxas_$variant.txt" 2>&1
    echo "== $variant"; grep -iE "registers|spill|serializ|warning" "$out/ptxas_$variant.txt" | head -8
done
sections="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy"
for variant in ${NCU_VARIANTS:-base tokamax_mosaic}; do
    kernel="regex:${NCU_KERNEL:-jattn_flash_forward|flash_attention}"
    timeout "${NCU_SECONDS:-150}" ncu --clock-control none $sections --launch-count 1 \
        -k "$kernel" python3 -m benchmarks.dev.mosaic_one_call --variant "$variant" --calls 1 \
        > "$out/ncu_$variant.txt" 2>&1
    echo "== ncu $variant"; grep -E "Duration|Throughput|Stall|Registers|Warp Cycles" \
        "$out/ncu_$variant.txt" | head -20
done
