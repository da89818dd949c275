#!/usr/bin/env bash
# A device command prepared in stop 44 (issue 14), about 8 minutes:
# 1. the H = 128 forward+backward rows (T = 2k..16k, both causal settings) re-run after the dq
#    kernel's paired products went on at H = 128 (PAIRED_DQ_HEAD_DIMS; A/B: causal 1.2-2.5%
#    faster), jattn mosaic beside cuDNN, to merge into the forward+backward table;
# 2. H = 64 causal T > 4096's backward retune, which stop 44's call cut (`jattn autotune
#    --searches backward` starts from the shipped config; merge with
#    `benchmarks/dev/table_from_log.py LOG --backward-only`).
set -uo pipefail
source benchmarks/gpu_env.sh
timeout 280 python3 -m benchmarks.flash --head-dims 128 --lengths 2048 4096 8192 16384 \
    --modes fwd+bwd --peers jattn_mosaic cudnn \
    --json "$out/flash_h200_bf16_fwdbwd_stop45_h128.json" > "$out/h128.txt" 2>&1
grep -h '"ms"' "$out/h128.txt" | cut -c1-170
timeout 150 python3 -m jattn.cli autotune --implementation mosaic --searches backward \
    --head-dims 64 --dtypes bfloat16 --causal yes --lengths 16384 --no-progress \
    --cache "$out/autotune_mosaic.json" \
    --log "$out/autotune_mosaic_h200_h64_causal_16k_backward_stop45.jsonl" > "$out/tune.txt" 2>&1
tail -5 "$out/tune.txt" | cut -c1-250
