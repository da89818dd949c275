"""A tuning log (`jattn autotune --log`, one JSON row per timed candidate) -> cache entries.

For a run whose cache lost buckets (stop 26: the reader refused bwd_dkdv_stages = null, so each
merge rewrote the file without the finished buckets) the log still holds every timing. Per
bucket with a complete last search, the entry is that search's fastest candidate (its config
carries the earlier searches' winners, which it started from). Candidates can be left out
(--exclude bwd_fused_dq=true). The log's times are the first round's, not the tuner's
confirmation rounds: a near tie may go the other way.

--forward-only: the log is of `jattn autotune --searches forward schedule` after a change to the
forward kernel alone (stop 35: the folded scale). Per bucket whose schedule search reached its
confirmation rounds, the table's entry (--out) takes that round's fastest candidate's forward
fields (every field but bwd_*) and forward/schedule times; its backward fields and time stay.
--backward-only: the log is of `jattn autotune --searches backward` (stop 44), which starts from
the shipped config: per bucket whose backward search reached its confirmation rounds, the
entry takes that round's fastest candidate's bwd_* fields and backward time.

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


def forward_fields(config: dict) -> dict:
    """The fields of a Mosaic config that the forward kernel reads (all but bwd_*)."""
    return {k: v for k, v in config.items() if not k.startswith("bwd_")}


def backward_fields(config: dict) -> dict:
    """The fields of a Mosaic config that only the backward kernels read (bwd_*)."""
    return {k: v for k, v in config.items() if k.startswith("bwd_")}


def confirmed_winners(rows, search: str = "schedule") -> dict[str, dict]:
    """{bucket text: the search's fastest row in the confirmation rounds}, for the buckets
    whose search reached them (a search cut short has none)."""
    best = {}
    for row in rows:
        if row["search"] == search and row.get("confirm") and row.get("ms") is not None:
            if row["bucket"] not in best or row["ms"] < best[row["bucket"]]["ms"]:
                best[row["bucket"]] = row
    return best


def forward_retune(rows, table: dict, device: str, measured: dict) -> list[cache.Entry]:
    """Entries of `table` ({Bucket: Entry}) with the forward fields of `rows`' confirmed
    schedule winners (--forward-only). A bucket the table lacks is skipped: it has no backward
    fields to keep."""
    confirmed_forward = collections.defaultdict(list)
    for row in rows:
        if row["search"] == "forward" and row.get("confirm") and row.get("ms") is not None:
            confirmed_forward[row["bucket"]].append(row["ms"])
    out = []
    for text, best in confirmed_winners(rows).items():
        bucket = _bucket(text, device)
        if bucket not in table:
            print(f"skipped {text}: not in the table")
            continue
        old = table[bucket]
        config = {**old.config, **forward_fields(best["config"])}
        ms = {**old.ms, "schedule": round(best["ms"], 4)}
        if confirmed_forward[text]:
            ms["forward"] = round(min(confirmed_forward[text]), 4)
        out.append(cache.Entry(bucket, config, ms, {**old.measured, "forward": measured}))
    return out


def backward_retune(rows, table: dict, device: str, measured: dict) -> list[cache.Entry]:
    """Entries of `table` ({Bucket: Entry}) with the backward fields of `rows`' confirmed
    backward winners (--backward-only: a log of `jattn autotune --searches backward`, which
    starts from the shipped config). A bucket the table lacks, or whose logged forward fields
    differ from the table's (the tune started from another config), is skipped."""
    out = []
    for text, best in confirmed_winners(rows, "backward").items():
        bucket = _bucket(text, device)
        old = table.get(bucket)
        if old is None or any(
            best["config"].get(k) != v for k, v in forward_fields(old.config).items()
        ):
            print(f"skipped {text}: not in the table, or tuned from other forward fields")
            continue
        # fields the table leaves out (None: the kernel's rule) stay out unless the winner set them
        new = {k: v for k, v in backward_fields(best["config"]).items() if k in old.config or v}
        config = {**old.config, **new}
        ms = {**old.ms, "backward": round(best["ms"], 4)}
        out.append(cache.Entry(bucket, config, ms, {**old.measured, "backward": measured}))
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
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--forward-only", action="store_true", help="retune the forward fields of --out's entries"
    )
    only.add_argument(
        "--backward-only", action="store_true", help="retune the bwd_* fields of --out's entries"
    )
    args = parser.parse_args()
    exclude = dict((k, json.loads(v)) for k, v in (e.split("=", 1) for e in args.exclude))
    with open(args.log) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if args.forward_only or args.backward_only:
        retune = forward_retune if args.forward_only else backward_retune
        new = retune(rows, cache.load(args.out), args.device, json.loads(args.measured))
    else:
        new = entries(rows, args.device, exclude, json.loads(args.measured))
    cache.merge(args.out, new)
    for e in new:
        print(e.bucket, e.ms)


if __name__ == "__main__":
    main()
