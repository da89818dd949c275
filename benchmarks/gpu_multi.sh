#!/usr/bin/env bash
# One device command for issue 17 on the two-H200 machine (the device tool's nvidia-h200-x2):
# the two-GPU tests, `jattn demo decode` on 2 and 1 GPUs, then `benchmarks/multi_gpu.py` (one
# psum's latency, sharded decode at 32k and 128k, causal ring attention at 16k and 64k, Lamina's
# overlap at a batch that fills the attention GPU), the JSON written row by row. Every step's
# output is kept under $OUT. From the repository root, with .whl carried (4-5 min at stop 30;
# the benchmark alone 3 min):
#   bash benchmarks/gpu_multi.sh
#   PARTS="decode ring" BENCH_SECONDS=500 bash benchmarks/gpu_multi.sh
set -uo pipefail
source benchmarks/gpu_env.sh
nvidia-smi topo -m > "$out/topology.txt" 2>&1
# ring attention on 2 GPUs (the kernels' backward at the merged residuals) and 2 processes x
# 1 GPU under jax.distributed; no xdist: every test uses both GPUs
timeout "${TEST_SECONDS:-240}" python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -q \
    tests/test_ring_attention.py tests/test_multihost.py > "$out/multi_tests.txt" 2>&1
tail -3 "$out/multi_tests.txt"; grep -E "^(FAILED|ERROR)" "$out/multi_tests.txt" | head
for devices in 2 1; do
    timeout "${DEMO_SECONDS:-150}" python3 -m jattn.cli demo decode --devices $devices \
        --no-progress > "$out/demo_decode_$devices.txt" 2>&1
    echo "demo decode --devices $devices: rc $?"; tail -2 "$out/demo_decode_$devices.txt"
done
# shellcheck disable=SC2086  # word splitting of the list is wanted
timeout "${BENCH_SECONDS:-420}" python3 -m benchmarks.multi_gpu --json "$out/multi_gpu.json" \
    --parts ${PARTS:-collective decode ring overlap} > "$out/multi_gpu.txt" 2>&1
grep -E "^\{|Error" "$out/multi_gpu.txt" | cut -c1-220
# the same decode and ring runs as 2 processes x 1 GPU under jax.distributed (issue 18's
# multi-process item; not yet run on the GPUs)
timeout "${PROCESSES_SECONDS:-200}" python3 -m benchmarks.multi_gpu --processes 2 \
    --json "$out/multi_gpu_processes.json" --parts collective decode ring \
    > "$out/multi_gpu_processes.txt" 2>&1
grep -E "^\{|Error|failed" "$out/multi_gpu_processes.txt" | cut -c1-220
