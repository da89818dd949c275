"""Issue 14's targets against the committed H200 runs: every cell, met or missed, with its ratio.

    python -m benchmarks.targets [--forward F.json] [--forward-backward FB.json]
        [--auto A.json] [--features FEAT.json] [--misses-only]

The targets (issue 14, "Targets"):
- forward: jattn mosaic >= 1.05x cuDNN and >= 1.0x tokamax at T >= 2k; >= 0.95x the best peer
  at T = 512-1k;
- forward+backward: >= 1.0x cuDNN at H = 64 and 128; >= 0.9x cuDNN at H = 256;
- auto: jattn auto >= 0.98x the best of cuDNN and tokamax in every cell measured;
- features: jattn mosaic >= 1.0x tokamax on every feature both serve.
Ratios are of speed (time of the peer / time of jattn), so above 1 is faster. Runs of
`benchmarks/flash.py` give TFLOP/s per cell, the features run gives ms.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
FORWARD = RESULTS / "flash_h200_bf16_fwd_stop46.json"
FORWARD_BACKWARD = RESULTS / "flash_h200_bf16_fwdbwd_stop46.json"
AUTO = RESULTS / "flash_h200_auto_check_fwd_stop46.json"
FEATURES = RESULTS / "flash_features_h200_merged_stop46.json"


def _speeds(path: Path, mode: str) -> list[tuple[tuple[int, bool, int], dict[str, float]]]:
    """[((head_dim, causal, length), {peer: 1 / ms}), ...] of one flash.py run's rows in
    `mode`, sorted."""
    cells = {}
    for row in json.loads(path.read_text())["rows"]:
        if row.get("mode") == mode and row.get("ms"):
            key = (row["head_dim"], row["causal"], row["length"])
            cells.setdefault(key, {})[row["peer"]] = 1.0 / row["ms"]
    return sorted(cells.items())


def _name(key: tuple[int, bool, int]) -> str:
    head_dim, causal, length = key
    return f"H={head_dim} {'causal' if causal else 'full'} T={length}"


def _row(table: str, cell: str, ratios: dict[str, tuple[float, float]]) -> dict:
    """ratios: {what: (ratio, target)} -> a result row; met when every ratio reaches its target."""
    met = all(ratio >= target * (1 - 1e-9) for ratio, target in ratios.values())  # (float ties)
    return dict(table=table, cell=cell, met=met, ratios=ratios)


def forward_rows(path: Path) -> list[dict]:
    rows = []
    for key, speed in _speeds(path, "fwd"):
        if not {"jattn_mosaic", "cudnn", "tokamax_mosaic"} <= set(speed):
            continue
        ours = speed["jattn_mosaic"]
        if key[2] >= 2048:  # T
            ratios = {
                "cudnn": (ours / speed["cudnn"], 1.05),
                "tokamax": (ours / speed["tokamax_mosaic"], 1.0),
            }
        else:
            best = max(speed["cudnn"], speed["tokamax_mosaic"])
            ratios = {"best peer": (ours / best, 0.95)}
        rows.append(_row("forward", _name(key), ratios))
    return rows


def forward_backward_rows(path: Path) -> list[dict]:
    rows = []
    for key, speed in _speeds(path, "fwd+bwd"):
        if not {"jattn_mosaic", "cudnn"} <= set(speed):
            continue
        target = 0.9 if key[0] > 128 else 1.0  # head dim
        ratios = {"cudnn": (speed["jattn_mosaic"] / speed["cudnn"], target)}
        rows.append(_row("forward+backward", _name(key), ratios))
    return rows


def auto_rows(path: Path) -> list[dict]:
    rows = []
    for key, speed in _speeds(path, "fwd"):
        peers = [speed[p] for p in ("cudnn", "tokamax_mosaic") if p in speed]
        if "jattn_auto" not in speed or not peers:
            continue
        ratios = {"best of cuDNN, tokamax": (speed["jattn_auto"] / max(peers), 0.98)}
        rows.append(_row("auto (forward)", _name(key), ratios))
    return rows


def feature_rows(path: Path) -> list[dict]:
    ms = {}
    for row in json.loads(path.read_text())["rows"]:
        if row.get("ms"):
            ms.setdefault((row["feature"], row["mode"]), {})[row["peer"]] = row["ms"]
    rows = []
    for (feature, mode), peers in ms.items():
        if {"jattn_mosaic", "tokamax_mosaic"} <= set(peers):
            ratio = peers["tokamax_mosaic"] / peers["jattn_mosaic"]
            rows.append(_row("features", f"{feature} {mode}", {"tokamax": (ratio, 1.0)}))
    return rows


def format_row(row: dict) -> str:
    ratios = ", ".join(
        f"{ratio:.3f}x {what} (>= {target})" for what, (ratio, target) in row["ratios"].items()
    )
    return f"{'met ' if row['met'] else 'MISS'} {row['table']:<17} {row['cell']:<24} {ratios}"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward", type=Path, default=FORWARD)
    parser.add_argument("--forward-backward", type=Path, default=FORWARD_BACKWARD)
    parser.add_argument("--auto", type=Path, default=AUTO)
    parser.add_argument("--features", type=Path, default=FEATURES)
    parser.add_argument("--misses-only", action="store_true")
    args = parser.parse_args(argv)
    rows = (
        forward_rows(args.forward)
        + forward_backward_rows(args.forward_backward)
        + auto_rows(args.auto)
        + feature_rows(args.features)
    )
    for row in rows:
        if row["met"] and args.misses_only:
            continue
        print(format_row(row))
    by_table = {}
    for row in rows:
        met, total = by_table.get(row["table"], (0, 0))
        by_table[row["table"]] = (met + row["met"], total + 1)
    print("; ".join(f"{table}: {met} of {total} met" for table, (met, total) in by_table.items()))
    return rows


if __name__ == "__main__":
    main()
