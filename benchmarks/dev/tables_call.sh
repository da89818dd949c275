#!/usr/bin/env bash
# One device command (issue 14, stop 37): the fp16 rows at H = 128 (jattn mosaic, cuDNN, tokamax
# mosaic; T = 1k, 4k, 16k), then the features table at H = 128, T = 4k (jattn mosaic, jattn auto,
# tokamax mosaic, cuDNN where it serves) for FEATURES (default: all). From the repository root,
# .whl carried (all features: about 12 minutes; split it with FEATURES to fit a call):
#   FEATURES="window gqa" bash benchmarks/dev/tables_call.sh
set -uo pipefail
source benchmarks/gpu_env.sh
timeout "${F16_SECONDS:-170}" python3 -m benchmarks.flash --head-dims 128 \
    --lengths 1024 4096 16384 --dtype float16 --repeats 5 --json "$out/flash_h200_f16_h128.json" \
    --peers jattn_mosaic cudnn tokamax_mosaic 2>&1 | grep '"ms"' | cut -c1-150
timeout "${FEATURES_SECONDS:-420}" python3 -m benchmarks.flash_features \
    --json "$out/flash_features_h200.json" ${FEATURES:+--features $FEATURES} 2>&1 \
    | grep '"feature"' | cut -c1-150
