"""Opcode and stall-reason mix of a kernel from Nsight Compute's source page (issues 14-16).

Reads the CSV that `ncu --section SourceCounters --page source --print-source sass --csv`
writes (one row per SASS instruction: its text, executions, warp-stall samples by reason; see
`benchmarks/dev/flex_alibi_sass.sh`) and prints, per file, the instructions executed per unit
of work (e.g. per score-tile element: 8192 * 8192 * 16 for an 8k forward with 16 heads) by
opcode, and the stall samples by reason, side by side.

Run: python -m benchmarks.dev.sass_mix A.csv B.csv --per 1073741824 [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import csv
import pathlib


def read(path: str) -> tuple[collections.Counter, collections.Counter]:
    """(warp instructions executed by opcode, stall samples by reason) of one source page."""
    lines = pathlib.Path(path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    rows = csv.reader(lines[start:])
    header = next(rows)
    executed, source = header.index("Instructions Executed"), header.index("Source")
    reasons = [(i, h) for i, h in enumerate(header) if h.startswith("stall_") and "(" not in h]
    opcodes, stalls = collections.Counter(), collections.Counter()
    for row in rows:
        if len(row) <= executed or not row[executed].replace(",", "").isdigit():
            continue
        words = row[source].split()
        if not words:
            continue
        opcode = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        opcodes[opcode.split(".")[0]] += int(row[executed].replace(",", ""))
        for i, reason in reasons:
            value = row[i].replace(",", "")
            if value.isdigit():
                stalls[reason.removeprefix("stall_")] += int(value)
    return opcodes, stalls


def table(paths: list[str], per: float, top: int) -> str:
    mixes = [read(p) for p in paths]
    names = [pathlib.Path(p).stem for p in paths]
    lines = ["| opcode | " + " | ".join(names) + " |", "|---" * (len(paths) + 1) + "|"]
    total = collections.Counter()
    for opcodes, _ in mixes:
        total.update(opcodes)
    per_warp = per / 32  # warp instructions: 32 threads each
    for opcode, _ in total.most_common(top):
        cells = [f"{m[0][opcode] / per_warp:.2f}" for m in mixes]
        lines.append(f"| {opcode} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(f"{sum(m[0].values()) / per_warp:.2f}" for m in mixes))
    lines += ["", "| stall reason (samples) | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(paths) + 1) + "|")
    reasons = collections.Counter()
    for _, stalls in mixes:
        reasons.update(stalls)
    for reason, _ in reasons.most_common(top):
        lines.append(f"| {reason} | " + " | ".join(str(m[1][reason]) for m in mixes) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--per", type=float, default=1.0, help="units of work: per-unit counts")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(table(args.csv, args.per, args.top))


if __name__ == "__main__":
    main()
