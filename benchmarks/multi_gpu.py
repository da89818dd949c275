"""Issue 17's measurements on the devices of one host: sharded decode, ring attention, Lamina's
overlap and one collective's latency, each against one device, written to one JSON.

On the two-H200 machine (the device tool's `nvidia-h200-x2`), from the repository root:

    python -m benchmarks.multi_gpu --json $OUT/multi_gpu.json

`--small` shrinks every shape for a smoke run on simulated CPU devices (the CPU test runs it;
its times say nothing about GPUs). The one-device and sharded runs of a cell are timed in rounds
(`tuner.time_ms_rounds`: medians over `--repeats` rounds, after warm-up), a run that fails gets
its error in the row; rows are written as they finish.

- collective: a psum of a bf16 scalar and of a [B, N, H] bf16 array over all devices inside
  `jax.shard_map` (the floor of one sharded decode step: its merge is one such reduction).
- decode: `jattn.decode_attention` on one device against `offload.sharded_decode_attention`
  by heads and by sequence over all devices, bf16, B = 8, N = 32, K = 8, H = 128, lengths
  spread from S/3 to S; the cache placed on the mesh once (as `KVCache` keeps it). Bandwidth:
  KV bytes of the valid tokens read per second.
- ring: `jattn.dot_product_attention` on one device against `jattn.parallel.ring_attention`
  over all devices, causal, bf16, B = 1, N = K = 16, H = 128; forward and forward + backward;
  TFLOP/s by the FlashAttention convention (causal: half of 4 B N T^2 H forward, 2.5x that
  for forward + backward).
- overlap: `jattn.offload.demo.overlap_benchmark` (tokens/s of the offloaded decoder with and
  without Lamina's micro-batches, and co-located on one device) for each `--batches`.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jattn
from jattn import offload, parallel
from jattn.autotune import tuner
from jattn.demo import environment
from jattn.offload import demo as offload_demo
from jattn.offload.sharded import cache_spec, check_shardable

DECODE = dict(batch=8, heads=32, kv_heads=8, head_dim=128)
RING = dict(batch=1, heads=16, kv_heads=16, head_dim=128)
SMALL_DECODE = dict(batch=4, heads=16, kv_heads=8, head_dim=16)  # K: heads over 8 devices
SMALL_RING = dict(batch=1, heads=2, kv_heads=2, head_dim=16)
PARTS = ("collective", "decode", "ring", "overlap")


def _jit(fn: Callable, mode: str) -> Callable:
    """The forward, or (mode 'fwd+bwd') dq, dk, dv of the sum of fn's output, jitted."""
    if mode == "fwd":
        return jax.jit(fn)
    return jax.jit(
        jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    )


def _rounds(calls: dict, repeats: int) -> dict:
    """`tuner.time_ms_rounds`; on simulated CPU devices each call waits for its result (many
    collective programs dispatched back to back stalled XLA:CPU's rendezvous on 2 cores)."""
    if jax.devices()[0].platform == "cpu":
        calls = {
            name: functools.partial(lambda f: jax.block_until_ready(f()), f)
            for name, f in calls.items()
        }
    return tuner.time_ms_rounds(calls, repeats)


def _ms(ms: float | str) -> dict:
    """A row's time, or the error of a run that failed (`tuner.time_ms_rounds`)."""
    return dict(ms=ms) if isinstance(ms, float) else dict(error=ms)


def _ratio(base: float | str, ms: float) -> float | None:
    return base / ms if isinstance(base, float) else None


def collective(devices, *, batch: int, heads: int, head_dim: int, repeats: int) -> list[dict]:
    """One psum's latency over the mesh: a scalar and a decode step's output."""
    mesh = offload.make_mesh(devices)
    calls, sizes = {}, {}
    for name, shape in (
        ("scalar", (len(devices),)),
        ("decode_out", (len(devices), batch * heads, head_dim)),
    ):
        x = jax.device_put(jnp.ones(shape, jnp.bfloat16), NamedSharding(mesh, P("attn")))
        psum = jax.shard_map(
            lambda x: jax.lax.psum(x, "attn"), mesh=mesh, in_specs=P("attn"), out_specs=P("attn")
        )
        calls[name] = functools.partial(jax.jit(psum), x)
        sizes[name] = int(np.prod(shape[1:], dtype=np.int64)) * 2
    rows = []
    for name, ms in _rounds(calls, repeats).items():
        rows.append(dict(part="collective", what=f"psum {name}", bytes=sizes[name], **_ms(ms)))
    return rows


def decode(devices, lengths: list[int], shape: dict, *, repeats: int) -> list[dict]:
    """One device against sharding by heads and by sequence, per cache length S."""
    mesh = offload.make_mesh(devices)
    b, n, k, h = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    rows = []
    for s in lengths:
        rng = np.random.default_rng(s)
        key = jax.random.key(s)
        q = jax.random.normal(key, (b, n, h), jnp.bfloat16)
        cache = jax.random.normal(jax.random.fold_in(key, 1), (2, b, s, k, h), jnp.bfloat16)
        kv_len = rng.integers(s // 3, s + 1, b).astype(np.int32)
        kv_bytes = 2 * int(kv_len.sum()) * k * h * 2  # K and V of the valid tokens, bf16
        lens = jnp.asarray(kv_len)
        one = jax.jit(lambda q, kc, vc, lens: jattn.decode_attention(q, kc, vc, lens))
        calls = {(1, None): functools.partial(one, q, cache[0], cache[1], lens)}
        for shard_by in ("heads", "sequence"):
            try:
                check_shardable(cache.shape[1:], mesh, "attn", shard_by)
            except ValueError as error:
                rows.append(dict(part="decode", S=s, shard_by=shard_by, error=str(error)[:200]))
                continue
            placed = NamedSharding(mesh, cache_spec(shard_by, "attn"))
            kc, vc = (jax.device_put(c, placed) for c in cache)

            def sharded(q, kc, vc, lens, shard_by=shard_by):
                return offload.sharded_decode_attention(
                    q, kc, vc, lens, mesh=mesh, shard_by=shard_by
                )

            calls[(len(devices), shard_by)] = functools.partial(jax.jit(sharded), q, kc, vc, lens)
        times = _rounds(calls, repeats)
        for (count, shard_by), ms in times.items():
            row = dict(part="decode", S=s, devices=count, shard_by=shard_by, **_ms(ms))
            if isinstance(ms, float):
                row.update(tbps=kv_bytes / ms / 1e9, speedup=_ratio(times[(1, None)], ms))
            rows.append(row)
    return rows


def ring(devices, lengths: list[int], shape: dict, *, repeats: int) -> list[dict]:
    """Causal attention over T tokens: one device against the ring over all devices."""
    mesh = jax.make_mesh((len(devices),), ("seq",), devices=devices)
    b, n, k, h = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    rows = []
    for t in lengths:
        key = jax.random.key(t)
        q = jax.random.normal(key, (b, t, n, h), jnp.bfloat16)
        kv = jax.random.normal(jax.random.fold_in(key, 1), (2, b, t, k, h), jnp.bfloat16)
        flops = 4 * b * n * t * t * h / 2  # causal: half the matrix
        seq = NamedSharding(mesh, P(None, "seq"))
        placed = [jax.device_put(x, seq) for x in (q, kv[0], kv[1])]

        def one(q, k, v):
            return jattn.dot_product_attention(q, k, v, is_causal=True)

        def over_ring(q, k, v):
            return parallel.ring_attention(q, k, v, mesh=mesh, axis="seq", is_causal=True)

        for mode in ("fwd", "fwd+bwd"):
            calls = {
                1: functools.partial(_jit(one, mode), q, kv[0], kv[1]),
                len(devices): functools.partial(_jit(over_ring, mode), *placed),
            }
            times = _rounds(calls, repeats)
            work = flops * (1.0 if mode == "fwd" else 2.5)
            for count, ms in times.items():
                row = dict(part="ring", T=t, mode=mode, devices=count, **_ms(ms))
                if isinstance(ms, float):
                    row.update(tflops=work / ms / 1e9, speedup=_ratio(times[1], ms))
                rows.append(row)
    return rows


def overlap(devices, batches: list[int], config, *, steps: int) -> list[dict]:
    """Lamina's micro-batched decoder against the plain offloaded one and one device."""
    rows = []
    for batch in batches:
        row = dict(
            part="overlap",
            **offload_demo.overlap_benchmark(devices, config, batch=batch, steps=steps),
        )
        errors = [v for k, v in row.items() if k.startswith("tokens_per_s") and isinstance(v, str)]
        if errors:  # a decoder that could not run (the co-located one out of memory: expected)
            row["error"] = "; ".join(errors)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--ring-lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="CPU smoke sizes")
    args = parser.parse_args(argv)
    devices = jax.devices()
    if len(devices) < 2:
        raise SystemExit(f"needs 2 or more devices, found {len(devices)}")
    decode_shape, ring_shape = (SMALL_DECODE, SMALL_RING) if args.small else (DECODE, RING)
    model = dict(layers=8, heads=32, kv_heads=8, head_dim=128, max_len=4096, dtype="bfloat16")
    if args.small:
        model = dict(layers=1, heads=8, kv_heads=4, head_dim=8, max_len=32)
    config = offload.GPTConfig(**model)
    record = dict(environment=environment(), devices=len(devices), rows=[])

    def save(rows):
        record["rows"].extend(rows)
        for row in rows:
            print(row, flush=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)

    out_shape = {name: decode_shape[name] for name in ("batch", "heads", "head_dim")}
    parts = {
        "collective": lambda: collective(devices, **out_shape, repeats=args.repeats),
        "decode": lambda: decode(devices, args.decode_lengths, decode_shape, repeats=args.repeats),
        "ring": lambda: ring(devices, args.ring_lengths, ring_shape, repeats=args.repeats),
        "overlap": lambda: overlap(devices, args.batches, config, steps=4 if args.small else 32),
    }
    for name in args.parts:
        save(parts[name]())


if __name__ == "__main__":
    main()
