"""What `mosaic_common.flag_nonfinite` costs a short causal forward, and cheaper ways to read
the same flag (issue 14, stop 36). Part 1: formulations of "batch row b of V holds a NaN or an
inf" on V [16k / T, T, 16, 128] bf16, each checked against the current one on a V with planted
NaN/inf and timed alone. Part 2: the causal forward at short T with the flag (the shipped
kernel) and without (`CLEAN_HIDDEN` False), beside tokamax and cuDNN, in one process (each
setting compiled after `jax.clear_caches()`).

Run: python -m benchmarks.dev.flag_cost --json OUT.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flash
from benchmarks.dev.clean_hidden_ab import compiled
from pallas_kernels import mosaic_common


def _all_finite(x):  # the shipped formulation
    return ~jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)


def _two_stage(x):  # rows of one token first, then the tokens
    per_token = jnp.isfinite(x).reshape(*x.shape[:2], -1).all(axis=2)
    return ~per_token.all(axis=1)


def _sum(x):  # NaN and inf survive a float32 sum (an overflow only flags too much)
    return ~jnp.isfinite(x.astype(jnp.float32).reshape(x.shape[0], -1).sum(axis=1))


def _max_bits(x):  # 16-bit floats: not finite <=> all exponent bits set
    bits = lax_bitcast(x).reshape(x.shape[0], -1) & np.uint16(0x7FFF)
    exponent = np.uint16(0x7F80 if x.dtype == jnp.bfloat16 else 0x7C00)
    return bits.max(axis=1) >= exponent


def _max_bits_two_stage(x):
    bits = lax_bitcast(x).reshape(*x.shape[:2], -1) & np.uint16(0x7FFF)
    exponent = np.uint16(0x7F80 if x.dtype == jnp.bfloat16 else 0x7C00)
    return bits.max(axis=2).max(axis=1) >= exponent


def lax_bitcast(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


FLAGS = {
    "all_finite": _all_finite,
    "two_stage": _two_stage,
    "sum": _sum,
    "max_bits": _max_bits,
    "max_bits_two_stage": _max_bits_two_stage,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--flag-lengths", type=int, nargs="+", default=[512, 1024, 4096, 16384])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []  # record_together writes them to --json after every cell
    for length in args.flag_lengths:
        batch = flash.TOKENS // length
        v = jax.random.normal(jax.random.key(0), (batch, length, 16, 128), jnp.bfloat16)
        bad = v.at[batch // 2, length - 1, 3, 7].set(jnp.nan).at[0, 0, 0, 0].set(-jnp.inf)
        want = np.asarray(_all_finite(bad))
        fns = {}
        for name, fn in FLAGS.items():
            fn = jax.jit(fn)
            ok = bool((np.asarray(fn(bad)) == want).all()) and not bool(np.asarray(fn(v)).any())
            rows.append(dict(part="flag", length=length, peer=name, agrees=ok))
            fns[name] = fn
        flash.record_together(fns, (v,), args.repeats, dict(part="flag", length=length), rows,
                              args.json)  # fmt: skip
    for head_dim in args.head_dims:
        for length in args.lengths:
            batch, heads = flash.TOKENS // length, flash.HIDDEN // head_dim
            shape = (batch, length, heads, head_dim)
            q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
            fns = {}
            for name, peer, clean in (
                ("jattn_flagged", "jattn_mosaic", True),
                ("jattn_no_flag", "jattn_mosaic", False),
                ("tokamax", "tokamax_mosaic", True),
                ("cudnn", "cudnn", True),
            ):
                mosaic_common.CLEAN_HIDDEN = clean
                fn = flash.timed_fn(flash.PEERS[peer], q, True, "fwd")
                fns[name] = compiled(fn, (q, k, v))
            mosaic_common.CLEAN_HIDDEN = True
            cell = dict(part="forward", head_dim=head_dim, length=length, causal=True)
            flash.record_together(fns, (q, k, v), args.repeats, cell, rows, args.json)


if __name__ == "__main__":
    main()
