#!/usr/bin/env bash
# One device command for issue 17 on the two-H200 machine (the device tool's nvidia-h200-x2):
# `jattn demo decode` on both GPUs, then `benchmarks/multi_gpu.py` (one psum's latency, sharded
# decode at 32k and 128k, causal ring attention at 16k and 64k, Lamina's overlap at two batches),
# the JSON written row by row. Every step's output is kept under $OUT. From the repository root,
# with .whl carried (not yet timed on the GPUs):
#   bash benchmarks/gpu_multi.sh
#   PARTS="decode ring" BENCH_SECONDS=500 bash benchmarks/gpu_multi.sh
set -uo pipefail
source benchmarks/gpu_env.sh
nvidia-smi topo -m > "$out/topology.txt" 2>&1
timeout "${DEMO_SECONDS:-150}" python3 -m jattn.cli demo decode --devices 2 --no-progress \
    > "$out/demo_decode.txt" 2>&1
tail -12 "$out/demo_decode.txt"
# shellcheck disable=SC2086  # word splitting of the list is wanted
timeout "${BENCH_SECONDS:-400}" python3 -m benchmarks.multi_gpu --json "$out/multi_gpu.json" \
    --parts ${PARTS:-collective decode ring overlap} > "$out/multi_gpu.txt" 2>&1
grep -E "^\{|Error" "$out/multi_gpu.txt" | cut -c1-220
