"""Build the measured dispatch table of one GPU from committed `benchmarks/flash.py` runs.

    python -m benchmarks.dispatch_table benchmarks/results/flash_h200_bf16_fwd_stop35.json \
        benchmarks/results/flash_h200_bf16_fwdbwd_stop36.json

writes `jattn/autotune/dispatch_tables/<device kind>.json` (`jattn.autotune.dispatch` says how
`implementation=None` uses it); `--check` compares instead of writing (tests/test_dispatch.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from jattn.autotune import dispatch
from jattn.autotune.cache import normalize_device_kind


def device_of(run: dict) -> str:
    """'gpu (NVIDIA H200)' (benchmarks' environment()) -> 'nvidia_h200'."""
    match = re.search(r"\((.*)\)", run["device"])
    return normalize_device_kind(match.group(1) if match else run["device"])


def table_from(paths: list[str]) -> dict:
    runs = [json.load(open(path)) for path in paths]
    devices = {device_of(run) for run in runs}
    if len(devices) != 1:
        raise ValueError(f"runs of one device kind make a table, got {sorted(devices)}")
    table = dispatch.build(runs, device=devices.pop())
    table["runs"] = [Path(path).name for path in paths]
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="benchmarks/flash.py JSON reports of one GPU")
    parser.add_argument("--check", action="store_true", help="compare with the shipped table")
    args = parser.parse_args(argv)
    table = table_from(args.runs)
    path = dispatch.table_path(table["device"])
    text = json.dumps(table, indent=1) + "\n"
    if args.check:
        same = path.exists() and path.read_text() == text
        print(f"{path}: {'up to date' if same else 'differs from the runs'}")
        return 0 if same else 1
    path.write_text(text)
    print(f"wrote {path} ({len(table['entries'])} buckets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
