"""Where the TSSA forward's time goes: each launch of `pallas_kernels.tssa`'s forward timed alone.

A development probe for issue 15 (numbers go to benchmarks/NOTES.md). For one shape it times the
three passes and the XLA glue between them, each jitted alone on inputs the previous stage made,
then sweeps the tiling of the first pass (a pure read: the streaming ceiling of these kernels)
and of the output pass, beside an XLA reduction and an XLA copy of the same bytes.

Run: python -m benchmarks.dev.tssa_passes --json OUT.json [--batch 1 --length 262144]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.tssa_variants import HEAD_DIM, HEADS, _inputs, _time
from jattn.demo import environment
from pallas_kernels import tssa as k


def _stages(w, temperature, causal: bool, config: k.Config):
    """{name: (jitted fn, args)} for each launch of the forward, args computed by the previous."""
    b, t, n, h = w.shape
    tile = k.tiling(b, t, n * h, config, causal)
    passes = k._passes(causal=causal, has_bias=False, seq_len=t, tile=tile, config=config)
    store_pi, fwd, mid = passes.store_pi, passes.forward, passes.middle
    config = passes.fwd_config  # its warps resolved (num_warps None: FORWARD_WARPS)
    nc = tile.num_chunks
    hb = jnp.zeros((n,), jnp.float32)
    sp = k._specs(fwd, w.shape, tile.chunk_t)
    spm = k._specs(mid, w.shape, tile.chunk_t)
    pi_spec = [spm["token_head"]] if store_pi else []
    pi_shape = [k._f32(b, tile.padded_len, n)] if store_pi else []

    sq = jax.jit(
        k._call(
            k._fwd_sq_kernel,
            fwd,
            config,
            w.shape,
            [sp["rows"]],
            sp["per_chunk"],
            k._f32(b, nc, n, h),
            "tssa_fwd_sq",
        )
    )

    def scan1(s1):
        if causal:
            return k._exclusive_scan(s1)
        total = jnp.sum(s1, axis=1, keepdims=True)
        return jnp.where(total > k.NORM_EPS_SQ, total, k.NORM_EPS_SQ)

    pi = jax.jit(
        k._call(
            k._fwd_pi_kernel,
            mid,
            config,
            w.shape,
            [spm["rows"], spm["state"], spm["head"], spm["head"]],
            [spm["per_chunk"], spm["per_chunk_head"], *pi_spec],
            [k._f32(b, nc, n, h), k._f32(b, nc, n), *pi_shape],
            "tssa_fwd_pi",
        )
    )

    def scan2(s2, s3):
        if causal:
            return k._exclusive_scan(s2), k._exclusive_scan(s3)
        t2, t3 = jnp.sum(s2, axis=1, keepdims=True), jnp.sum(s3, axis=1, keepdims=True)
        return 1.0 / (1.0 + t2 / (t3[..., None] + k.PI_EPS)), t3

    out = jax.jit(
        k._call(
            k._fwd_out_kernel,
            fwd,
            config,
            w.shape,
            [sp["rows"], sp["state"], sp["state"], sp["state_head"], sp["head"], sp["head"]]
            + ([sp["token_head"]] if store_pi else []),
            sp["rows"],
            jax.ShapeDtypeStruct(w.shape, w.dtype),
            "tssa_fwd_out",
        )
    )
    s1 = sq(w)
    c1 = jax.jit(scan1)(s1)
    s2, s3, *p = pi(w, c1, temperature, hb)
    c2, c3 = jax.jit(scan2)(s2, s3)
    return dict(
        sq=(sq, (w,)),
        scan1=(jax.jit(scan1), (s1,)),
        pi=(pi, (w, c1, temperature, hb)),
        scan2=(jax.jit(scan2), (s2, s3)),
        out=(out, (w, c1, c2, c3, temperature, hb, *p)),
    ), tile


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=262144)
    parser.add_argument("--no-sweep", action="store_true", help="the stages alone")
    args = parser.parse_args(argv)
    w, temperature, _ = _inputs(args.batch, args.length, jnp.bfloat16)
    gb = w.nbytes / 1e9
    rows = []

    def record(**row):
        rows.append(row)
        print(row, flush=True)

    record(name="xla_copy", ms=_time(jax.jit(lambda x: x * 2), w), gb_moved=2 * gb)
    read = jax.jit(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)), axis=1))
    record(name="xla_sum_sq", ms=_time(read, w), gb_moved=gb)
    for causal in (False, True):
        for store_pi in (False, True):
            config = k.Config(store_pi=store_pi)
            stages, tile = _stages(w, temperature, causal, config)
            moved = dict(sq=gb, pi=gb, out=2 * gb, scan1=0, scan2=0)
            for name, (fn, fargs) in stages.items():
                record(
                    name=name,
                    causal=causal,
                    store_pi=store_pi,
                    block_t=tile.block_t,
                    chunk_t=tile.chunk_t,
                    ms=_time(fn, *fargs),
                    gb_moved=moved[name],
                )
            full = jax.jit(
                lambda x, c=causal, cf=config: k.token_statistics_attention(
                    x, temperature, causal=c, config=cf
                )
            )
            record(name="forward", causal=causal, store_pi=store_pi, ms=_time(full, w))
    # tilings of the read pass (the streaming ceiling) and of the causal output pass
    for block_t in () if args.no_sweep else (8, 16, 32):
        for num_warps in (4, 8):
            for chunk_t in (128, 512, 2048):
                if chunk_t < block_t:
                    continue
                config = k.Config(
                    block_t=block_t, chunk_t=chunk_t, num_warps=num_warps, store_pi=True
                )
                for causal in (False, True):
                    stages, _ = _stages(w, temperature, causal, config)
                    for name in ("sq", "out") if causal else ("out",):
                        fn, fargs = stages[name]
                        try:
                            ms = _time(fn, *fargs)
                        except Exception as err:  # noqa: BLE001  (a tiling that fails)
                            record(name=name, config=repr(config), error=repr(err)[:200])
                            continue
                        record(
                            name=f"sweep_{name}",
                            causal=causal,
                            block_t=block_t,
                            num_warps=num_warps,
                            chunk_t=chunk_t,
                            ms=ms,
                            gb_moved=gb if name == "sq" else 2 * gb,
                        )
    for row in rows:
        if row.get("gb_moved") and row.get("ms"):
            row["tbps"] = row["gb_moved"] / row["ms"]
    with open(args.json, "w") as f:
        json.dump(
            dict(
                environment=environment(),
                shape=list(w.shape),
                heads=HEADS,
                head_dim=HEAD_DIM,
                rows=rows,
            ),
            f,
            indent=1,
            default=str,
        )


if __name__ == "__main__":
    main()
