"""Decode attention side by side: jattn's split-KV kernel vs cuDNN, XLA and JAX's Pallas example.

One query token per sequence against a full KV cache (lengths = S), bf16, H = 128, GQA 32/8 and
8/1, B = 1..64, S = 1k..128k (B·S <= 1M tokens: the kernel's int32 offsets). Decode is
memory-bound, so the figure of merit is achieved bandwidth = KV bytes read / time, set beside a
device copy (read + write of a 2 GiB array). Each time is the median over repeats of one
jit-compiled program of `INNER` dependent calls, unrolled (no Python dispatch, no while-loop
round trips in the time).

    python -m benchmarks.decode --out benchmarks/results/decode_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jattn
from jattn.decode import DecodeConfig
from jattn.demo import environment

HEAD_DIM = 128
GQA = [(32, 8), (8, 1)]
BATCHES = [1, 8, 64]
LENGTHS = [1024, 4096, 8192, 32768, 131072]
MAX_TOKENS = 1 << 20  # B·S
INNER = 10  # calls per timed program
REPEATS = 5


def timed_loop(fn, q, *args) -> float:
    """Median ms per call of fn(q, *args), INNER calls in one program, each on the last's result."""

    @jax.jit
    def loop(q, *args):
        for _ in range(INNER):
            out = fn(q, *args)
            q = q + (out * 1e-30).astype(q.dtype)  # a real dependency, negligible work
            q = jax.lax.optimization_barrier(q)  # XLA may not fuse one call into the next
        return q

    jax.block_until_ready(loop(q, *args))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(loop(q, *args))
        times.append((time.perf_counter() - start) * 1e3 / INNER)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a device copy (bytes read + written) of a 2 GiB bf16 array."""
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    ms = timed_loop(lambda x: x * 1.0001, x)  # x * c is one read and one write per element
    return 2 * x.nbytes / ms / 1e6


def implementations(config: DecodeConfig | None):
    from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

    def ours(q, k, v, lengths):
        return jattn.decode_attention(q, k, v, lengths, implementation="triton", config=config)

    def cudnn(q, k, v, lengths):
        return jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=lengths, implementation="cudnn"
        )[:, 0]

    def xla(q, k, v, lengths):
        return jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=lengths, implementation="xla"
        )[:, 0]

    def pallas_example(q, k, v, lengths):
        return pallas_decode.gqa(q, k, v, kv_seq_len=lengths)

    return dict(jattn=ours, cudnn=cudnn, xla=xla, pallas_example=pallas_example)


def inputs(batch, length, heads, kv_heads, key):
    keys = jax.random.split(key, 3)
    q = jax.random.normal(keys[0], (batch, heads, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], k.shape, jnp.bfloat16)
    return q, k, v, jnp.full((batch,), length, jnp.int32)


def tune(shapes) -> tuple[DecodeConfig, list[dict]]:
    """A small sweep of tilings on a few shapes; the best total time wins."""
    candidates = [
        DecodeConfig(
            block_k=bk, num_warps=w, num_stages=st, programs_per_sm=pps, unmasked_body=unmasked
        )
        for bk, w, st, pps, unmasked in [
            (64, 4, 2, 4, False),  # the first run's default
            (128, 4, 3, 4, False),
            (64, 4, 2, 16, False),
            (128, 4, 2, 16, False),
            (128, 4, 3, 16, False),
            (64, 4, 3, 16, False),
            (64, 4, 2, 16, True),
            (128, 4, 3, 16, True),
            (64, 4, 3, 16, True),
            (128, 4, 2, 32, True),
            (64, 4, 4, 16, True),
            (128, 8, 3, 16, True),
        ]
    ]
    rows, times = [], {c: [] for c in candidates}
    for batch, length, heads, kv_heads in shapes:
        args = inputs(batch, length, heads, kv_heads, jax.random.key(1))
        for c in tqdm(candidates, desc=f"tune B={batch} S={length} {heads}/{kv_heads}"):
            fn = lambda q, k, v, lengths, c=c: jattn.decode_attention(
                q, k, v, lengths, implementation="triton", config=c
            )
            shape = [batch, length, heads, kv_heads]
            try:
                ms = timed_loop(fn, *args)
            except Exception as e:  # noqa: BLE001  (a tiling that does not compile is skipped)
                rows.append(dict(config=repr(c), shape=shape, error=str(e)[:200]))
                ms = float("inf")
            times[c].append(ms)
            rows.append(dict(config=repr(c), shape=shape, ms=ms))
    # Score: geometric mean over shapes of time / the best time for that shape.
    best = np.min(list(times.values()), axis=0)
    score = {c: float(np.exp(np.mean(np.log(np.asarray(t) / best)))) for c, t in times.items()}
    rows.extend(dict(config=repr(c), score=score[c]) for c in candidates)
    return min(score, key=score.get), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    parser.add_argument("--no-tune", action="store_true", help="use the default DecodeConfig")
    args = parser.parse_args()

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(environment(), head_dim=HEAD_DIM, dtype="bfloat16", inner=INNER)
    record["copy_GBps"] = copy_bandwidth()
    print(f"device copy: {record['copy_GBps']:.0f} GB/s")
    config = None
    if not args.no_tune:
        config, record["tuning"] = tune(
            [(8, 131072, 32, 8), (1, 131072, 8, 1), (64, 8192, 32, 8), (1, 8192, 32, 8)]
        )
        print(f"tuned: {config}")
    record["config"] = repr(config or DecodeConfig())
    impls = implementations(config)
    shapes = [
        (b, s, n, k) for (n, k) in GQA for b in BATCHES for s in LENGTHS if b * s <= MAX_TOKENS
    ]
    rows = []
    for batch, length, heads, kv_heads in tqdm(shapes, desc="decode"):
        args_ = inputs(batch, length, heads, kv_heads, jax.random.key(0))
        kv_bytes = 2 * batch * length * kv_heads * HEAD_DIM * 2
        want = impls["xla"](*args_)
        for name, fn in impls.items():
            row = dict(impl=name, batch=batch, length=length, heads=heads, kv_heads=kv_heads)
            try:
                err = float(jnp.max(jnp.abs(jax.jit(fn)(*args_).astype(jnp.float32) - want)))
                ms = timed_loop(fn, *args_)
                row.update(ms=ms, GBps=kv_bytes / ms / 1e6, max_err_vs_xla=err)
            except Exception as e:  # noqa: BLE001  (a peer that cannot serve a shape)
                row.update(error=str(e).splitlines()[0][:200])
            rows.append(row)
            tqdm.write(json.dumps(row))
        del args_
        record["rows"] = rows
        out.write_text(json.dumps(record, indent=2) + "\n")  # after every shape: keep partials
    try:
        plot(record, out.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001  (the JSON is the result; the plot can be redrawn)
        print(f"plot failed: {e}")


def plot(record: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(GQA), len(BATCHES), figsize=(15, 8), sharey=True)
    for (i, (n, k)), (j, b) in itertools.product(enumerate(GQA), enumerate(BATCHES)):
        ax = axes[i][j]
        for name in ("jattn", "cudnn", "xla", "pallas_example"):
            pts = [
                (r["length"], r["GBps"])
                for r in record["rows"]
                if r["impl"] == name and r["batch"] == b and r["heads"] == n and "GBps" in r
            ]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=name)
        ax.axhline(record["copy_GBps"], color="gray", ls="--", label="device copy")
        ax.set_xscale("log", base=2)
        ax.set_title(f"B={b}, N/K={n}/{k}")
        ax.set_xlabel("S (keys)")
        if j == 0:
            ax.set_ylabel("KV bytes read / time (GB/s)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"decode attention, bf16 H=128, {record['device']}, jax {record['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
