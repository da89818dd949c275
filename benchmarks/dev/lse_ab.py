"""A/B of `pallas_kernels.flash_mosaic_bwd.LSE_BASE2_OUTSIDE` (issue 14): the Mosaic backward
with the lse converted to base 2 once by XLA, or per tile in its kernels (before), beside
cuDNN, timed in rounds in one process (each setting compiled before the timing).

Run: python -m benchmarks.dev.lse_ab --json OUT.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import jattn
from benchmarks.flash import time_ms_together, timed_fn
from jattn.demo import environment
from pallas_kernels import flash_mosaic_bwd

HEADS, HEAD_DIM, TOKENS = 16, 128, 16384


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []
    for length in args.lengths:
        shape = (max(1, TOKENS // length), length, HEADS, HEAD_DIM)
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
        for causal in (False, True):
            fns = {}
            for outside in (False, True):
                flash_mosaic_bwd.LSE_BASE2_OUTSIDE = outside
                fn = timed_fn(
                    lambda q, k, v, c: jattn.dot_product_attention(
                        q, k, v, is_causal=c, implementation="mosaic"
                    ),
                    q,
                    causal,
                    "fwd+bwd",
                )
                fns[f"mosaic, lse in base 2 {'by XLA' if outside else 'per tile'}"] = fn.lower(
                    q, k, v
                ).compile()
            cudnn = timed_fn(
                lambda q, k, v, c: jax.nn.dot_product_attention(
                    q, k, v, is_causal=c, implementation="cudnn"
                ),
                q,
                causal,
                "fwd+bwd",
            )
            fns["cudnn"] = cudnn.lower(q, k, v).compile()
            for name, ms in time_ms_together(fns, (q, k, v), args.repeats).items():
                row = dict(T=length, causal=causal, peer=name, ms=ms)
                print(row, flush=True)
                rows.append(row)
    with open(args.json, "w") as f:
        json.dump(dict(environment=environment(), rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
