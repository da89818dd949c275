"""Measured dispatch: the order in which `implementation=None` tries the GPU kernels, per bucket.

On Hopper, `jattn.attention.auto_order` tries cudnn, mosaic, triton. Where a shipped table
(`dispatch_tables/<device kind>.json`) has the call's bucket, the implementations it measured
come first, fastest first, and the others follow in the default order (an implementation that
declines a call, cuDNN with a soft cap say, falls through to the next as before).

A bucket: device kind, dtype, head dim padded to a power of two, causal, the length range of
max(T, S) (`jattn.autotune.LENGTH_RANGES`) and the mode: 'forward' for a call that is not
differentiated, 'forward+backward' for one under `jax.grad` / `jax.vjp` (seen from the tracers
at the call, as `dot_product_attention` sees them: a grad applied to a jit around the call
looks like a forward). Tables come from `benchmarks/dispatch_table.py`, which ranks each
bucket's implementations by the geometric mean of their TFLOP/s over the bucket's measured
lengths in committed `benchmarks/flash.py` runs; `tests/test_dispatch.py` rebuilds the shipped
tables from those runs.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax.numpy as jnp

from jattn.autotune import cache

FORMAT = "jattn-dispatch"
VERSION = 1
MODES = ("forward", "forward+backward")
# benchmarks/flash.py's peer names -> jattn implementations auto can call
PEER_IMPLEMENTATIONS = {"cudnn": "cudnn", "jattn_mosaic": "mosaic", "jattn_triton": "triton"}
_BENCH_MODES = {"fwd": "forward", "fwd+bwd": "forward+backward"}


def table_path(device: str) -> Path:
    return Path(__file__).parent / "dispatch_tables" / f"{device}.json"


@functools.cache
def _load(device: str) -> dict[tuple, tuple[str, ...]]:
    path = table_path(device)
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    if table.get("format") != FORMAT or table.get("version") != VERSION:
        return {}
    return {_key(**_bucket_fields(entry)): tuple(entry["order"]) for entry in table["entries"]}


def _bucket_fields(entry: dict) -> dict:
    names = ("dtype", "head_dim", "causal", "lengths", "mode")
    return {name: entry[name] for name in names}


def _key(*, dtype: str, head_dim: int, causal: bool, lengths: str, mode: str) -> tuple:
    return (dtype, head_dim, causal, lengths, mode)


def measured_order(
    *, device: str, dtype, head_dim: int, causal: bool, length: int, differentiated: bool
) -> tuple[str, ...] | None:
    """The measured order of the call's bucket (fastest first), or None: no table entry.

    length: max(T, S); differentiated: whether the call is under reverse-mode autodiff. A
    float16 call without entries of its own takes bfloat16's (`cache.SIBLING_DTYPES`)."""
    name = jnp.dtype(dtype).name
    table = _load(device)
    for dtype_name in (name, cache.SIBLING_DTYPES.get(name)):
        key = _key(
            dtype=dtype_name,
            head_dim=cache.bucket_head_dim(head_dim),
            causal=bool(causal),
            lengths=cache.length_range(length),
            mode=MODES[bool(differentiated)],
        )
        if key in table:
            return table[key]
    return None


def merge(measured: Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    """The measured implementations first, then the rest of `default` in its order."""
    first = tuple(name for name in (measured or ()) if name in default)
    return first + tuple(name for name in default if name not in first)


# --- building a table from benchmark runs ------------------------------------------------------


def build(runs: Iterable[dict], *, device: str) -> dict:
    """A dispatch table from `benchmarks/flash.py` JSON reports (their rows and environment).

    Each bucket ranks the implementations measured at every one of its lengths by the geometric
    mean of their TFLOP/s there (an implementation that failed a cell is left out of that
    bucket); buckets where fewer than two implementations qualify are left out."""
    cells: dict[tuple, dict[str, dict[int, float | None]]] = {}  # None: the cell failed
    sources = []
    for run in runs:
        sources.append({k: run[k] for k in ("device", "jax", "date") if k in run})
        for row in run["rows"]:
            name = PEER_IMPLEMENTATIONS.get(row["peer"])
            if name is None or row["mode"] not in _BENCH_MODES:
                continue
            key = _key(
                dtype=row["dtype"],
                head_dim=cache.bucket_head_dim(row["head_dim"]),
                causal=bool(row["causal"]),
                lengths=cache.length_range(row["length"]),
                mode=_BENCH_MODES[row["mode"]],
            )
            cells.setdefault(key, {}).setdefault(name, {})[row["length"]] = row.get("tflops")
    entries = []
    for key in sorted(cells, key=repr):
        per_name = cells[key]
        lengths = sorted({t for times in per_name.values() for t in times})
        means = {
            name: math.exp(sum(math.log(times[t]) for t in lengths) / len(lengths))
            for name, times in per_name.items()
            if all(times.get(t) for t in lengths)
        }
        if len(means) < 2:
            continue
        order = sorted(means, key=lambda name: -means[name])
        dtype, head_dim, causal, length_range, mode = key
        entries.append(
            dict(
                dtype=dtype,
                head_dim=head_dim,
                causal=causal,
                lengths=length_range,
                mode=mode,
                order=order,
                measured_lengths=lengths,
                tflops={name: round(means[name], 1) for name in order},
            )
        )
    return dict(format=FORMAT, version=VERSION, device=device, sources=sources, entries=entries)
