#!/usr/bin/env bash
# One device command (issue 14), written in stop 38 for the next session: what stop 38's redo
# defaults left untimed. 1. H = 256: the forward's and the dq kernel's redo against the
# cleaning (off there by default; `flash_mosaic.redo_defaults`), causal 2k and 16k, forward and
# forward+backward. 2. H = 64: the forward's redo spilled on default_config's 256-key tiles;
# on 128-key tiles (mosaic_variants, causal and not, 2k and 16k) and ptxas of that build.
# 3. H = 128 causal 16k forward+backward with the defaults (cut in stop 38's table call).
# From the repository root, .whl carried (about 8 minutes):
#   bash benchmarks/dev/redo_next_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
ab redo_ab h256 170 --head-dim 256 --lengths 2048 16384 --cells causal \
    --settings clean redo redo_bwd cudnn
timeout 170 python3 -m benchmarks.mosaic_variants --head-dims 64 --lengths 2048 16384 \
    --variants base redo_hidden_bk128 clean_hidden_bk128 --json "$out/variants_h64_redo.json" \
    > "$out/variants_h64.txt" 2>&1
grep -h "ms" "$out/variants_h64.txt" | cut -c1-160 | tail -20
MOSAIC_GPU_DUMP_PTXAS=1 timeout 40 python3 -m benchmarks.dev.mosaic_one_call --causal \
    --head-dim 64 --variant redo_hidden_bk128 --calls 0 > "$out/ptxas_h64_bk128.txt" 2>&1
grep -iE "spill|registers" "$out/ptxas_h64_bk128.txt" | sort | uniq -c | head -4
timeout 90 python3 -m benchmarks.flash --head-dims 128 --lengths 16384 --causal true \
    --modes fwd+bwd --peers jattn_mosaic cudnn tokamax_mosaic \
    --json "$out/flash_h200_causal_h128_16k_fwdbwd.json" 2>&1 | grep '"ms"' | cut -c1-160
