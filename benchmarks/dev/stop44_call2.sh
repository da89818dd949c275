#!/usr/bin/env bash
# Stop 44's second device command (issue 14), about 9 minutes: the H = 64 backward retuned
# (`jattn autotune --searches backward`, which now starts from the shipped table's config, so
# each bucket keeps its tuned forward fields), then the H = 64 forward+backward rows
# (T = 2k..16k, both causal settings) on the retuned cache beside cuDNN.
set -uo pipefail
source benchmarks/gpu_env.sh
start=$SECONDS
timeout 300 python3 -m jattn.cli autotune --implementation mosaic --searches backward \
    --head-dims 64 --dtypes bfloat16 --lengths 1024 4096 16384 --no-progress \
    --cache "$out/autotune_mosaic.json" --log "$out/autotune_mosaic_h200_h64_backward_stop44.jsonl" \
    > "$out/tune.txt" 2>&1
tail -25 "$out/tune.txt" | cut -c1-250
left=$((560 - (SECONDS - start)))
echo "rows: $left s"
JATTN_AUTOTUNE_CACHE="$out/autotune_mosaic.json" timeout "$left" python3 -m benchmarks.flash \
    --head-dims 64 --lengths 2048 4096 8192 16384 --modes fwd+bwd --peers jattn_mosaic cudnn \
    --json "$out/flash_h200_bf16_fwdbwd_stop44_h64.json" > "$out/h64.txt" 2>&1
grep -h '"ms"' "$out/h64.txt" | cut -c1-170
