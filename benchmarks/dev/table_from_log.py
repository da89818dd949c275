"""A tuning log (`jattn autotune --log`, one JSON row per timed candidate) -> cache entries.

For a run whose cache lost buckets (stop 26: the reader refused bwd_dkdv_stages = null, so each
merge rewrote the file without the finished buckets) the log still holds every timing. Per
bucket with a complete last search, the entry is that search's fastest candidate (its config
carries the earlier searches' winners, which it started from). Candidates can be left out
(--exclude bwd_fused_dq=true). The log's times are the first round's, not the tuner's
confirmation rounds: a near tie may go the other way.

    python -m benchmarks.dev.table_from_log LOG --out TABLE.json --device nvidia_h200 \
        --measured '{"device": "NVIDIA H200", "jax": "0.11.2", "date": "2026-11-30"}'
"""

import argparse
import collections
import json

from jattn import autotune
from jattn.autotune import cache, tuner


def _bucket(text: str, device: str) -> cache.Bucket:
    # "mosaic nvidia_h200 H=64 bfloat16 causal T<=4096"
    implementation, _, head, dtype, kind, lengths = text.split()
    return cache.Bucket(
        implementation=implementation,
        device=device,
        head_dim=int(head[2:]),
        dtype=dtype,
        causal=kind == "causal",
        lengths=lengths.removeprefix("T"),
    )


def entries(rows, device: str, exclude: dict, measured: dict) -> list[cache.Entry]:
    bucket_rows = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in rows:
        if row.get("ms") is None or any(row["config"].get(k) == v for k, v in exclude.items()):
            continue
        bucket_rows[row["bucket"]][row["search"]].append(row)
    out = []
    for text, searches in bucket_rows.items():
        bucket = _bucket(text, device)
        names = [s.name for s in cache.get_tunable(bucket.implementation).searches]
        plan = autotune.plan(
            bucket.implementation,
            head_dims=[bucket.head_dim],
            dtypes=[bucket.dtype],
            causal=[bucket.causal],
            lengths=[n for n in tuner.DEFAULT_LENGTHS if cache.length_range(n) == bucket.lengths],
            device=device,
        )[0]
        last = names[-1]
        complete = len(searches[last]) >= len(
            [c for c in plan.candidates[last] if not _excluded(c, exclude)]
        )
        if not complete:
            print(f"skipped {text}: its {last} search is incomplete")
            continue
        best = {name: min(searches[name], key=lambda r: r["ms"]) for name in names}
        ms = {name: round(best[name]["ms"], 4) for name in names}
        out.append(cache.Entry(bucket, best[last]["config"], ms, measured))
    return out


def _excluded(config, exclude: dict) -> bool:
    return any(getattr(config, k) == v for k, v in exclude.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--exclude", nargs="*", default=[], help="field=json_value")
    parser.add_argument("--measured", default="{}", help="JSON object stored with each entry")
    args = parser.parse_args()
    exclude = dict((k, json.loads(v)) for k, v in (e.split("=", 1) for e in args.exclude))
    with open(args.log) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    new = entries(rows, args.device, exclude, json.loads(args.measured))
    cache.merge(args.out, new)
    for e in new:
        print(e.bucket, e.ms)


if __name__ == "__main__":
    main()
