#!/usr/bin/env bash
# Stop 46 (issue 14's "Done when"): every -m gpu case of the Mosaic GPU kernel's tests
# (77 cases), verbose so that a cut run still names each case that finished.
set -uo pipefail
source benchmarks/gpu_env.sh
source benchmarks/dev/redo_common.sh
gpu_tests mosaic 545 -v --durations=20 tests/test_flash_mosaic.py
grep -c PASSED "$out/tests_mosaic.txt"; grep -E "FAILED|ERROR" "$out/tests_mosaic.txt" | head -20
