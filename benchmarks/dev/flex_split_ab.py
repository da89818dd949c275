"""A/B of the Mosaic flex kernels' visits by index order (issue 16): ALiBi's score_mod with
the unmasked tiles in three runs (`mosaic_common.split_by_index_order`) or in one, beside the
plain kernel, timed in rounds in one process (each setting compiled before the timing).

Run: python -m benchmarks.dev.flex_split_ab --json OUT.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import jattn
from benchmarks.flash import time_ms_together
from jattn.demo import environment
from pallas_kernels import mosaic_common

HEADS, HEAD_DIM = 16, 128


def alibi(score, b, h, q_idx, kv_idx):
    slope = jnp.exp2(-8.0 * (h + 1).astype(jnp.float32) / HEADS)
    return score - slope * jnp.abs(q_idx - kv_idx).astype(jnp.float32)


def compiled(fn, mode, q, k, v):
    if mode == "fwd":
        return jax.jit(fn).lower(q, k, v).compile()
    d_out = jax.random.normal(jax.random.key(9), q.shape, q.dtype)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * d_out)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows, uses = [], mosaic_common.flex_uses_index_order
    flex = lambda q, k, v: jattn.flex_attention(q, k, v, score_mod=alibi, implementation="mosaic")  # noqa: E731
    plain = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="mosaic")  # noqa: E731
    for length in args.lengths:
        shape = (1, length, HEADS, HEAD_DIM)
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
        for mode in ("fwd", "fwd+bwd"):
            fns = {}
            for split in (False, True):
                mosaic_common.flex_uses_index_order = uses if split else (lambda flex: False)
                name = f"alibi, {'three runs' if split else 'one run'}"
                fns[name] = compiled(flex, mode, q, k, v)
            mosaic_common.flex_uses_index_order = uses
            fns["plain"] = compiled(plain, mode, q, k, v)
            for name, ms in time_ms_together(fns, (q, k, v), args.repeats).items():
                row = dict(T=length, mode=mode, peer=name, ms=ms)
                print(row, flush=True)
                rows.append(row)
    with open(args.json, "w") as f:
        json.dump(dict(environment=environment(), rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
