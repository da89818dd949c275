"""One forward of the Mosaic GPU kernel (or a peer) at a FlashAttention shape: the target of
`benchmarks/gpu_profile_mosaic.sh` (ncu, ptxas dumps). Development probe (issue 14).

    python -m benchmarks.dev.mosaic_one_call --variant overlap --head-dim 128 --length 16384
    python -m benchmarks.dev.mosaic_one_call --variant bwd_split --head-dim 256 --grad
    python -m benchmarks.dev.mosaic_one_call --causal --grad --no-clean   # without the cleaning
    python -m benchmarks.dev.mosaic_one_call --grad --head-dim 256 --switch DQ_HALF_KEYS=False
"""

from __future__ import annotations

import argparse
import ast
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import flash, mosaic_variants
from pallas_kernels import flash_mosaic, flash_mosaic_bwd, mosaic_common


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="base", help="a mosaic_variants name, or a peer")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--calls", type=int, default=2, help="calls after the compile")
    parser.add_argument("--grad", action="store_true", help="forward+backward (dq, dk, dv)")
    parser.add_argument(
        "--no-clean", action="store_true", help="mosaic_common.CLEAN_HIDDEN = False (timing)"
    )
    parser.add_argument(
        "--switch",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a flash_mosaic or flash_mosaic_bwd module switch (a Python literal)",
    )
    args = parser.parse_args(argv)
    mosaic_common.CLEAN_HIDDEN = not args.no_clean
    for setting in args.switch:
        name, value = setting.split("=", 1)
        module = flash_mosaic if hasattr(flash_mosaic, name) else flash_mosaic_bwd
        if not hasattr(module, name):
            raise ValueError(f"no module switch {name!r} in flash_mosaic or flash_mosaic_bwd")
        setattr(module, name, ast.literal_eval(value))
    if args.variant in mosaic_variants.VARIANTS:
        changes = mosaic_variants.VARIANTS[args.variant]
        base = flash_mosaic.default_config(args.head_dim, causal=args.causal)
        config = dataclasses.replace(base, **{"softmax_overlap": False, **changes})
        peer = mosaic_variants._mosaic(config)
    else:
        peer = flash.PEERS[args.variant]
    batch, heads = flash.TOKENS // args.length, flash.HIDDEN // args.head_dim
    shape = (batch, args.length, heads, args.head_dim)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
    fn = jax.jit(lambda q, k, v: peer(q, k, v, args.causal))
    if args.grad:

        def loss(q, k, v):
            return peer(q, k, v, args.causal).astype(jnp.float32).sum()

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for _ in range(1 + args.calls):
        out = fn(q, k, v)
    jax.block_until_ready(out)
    print(args.variant, shape, "done")


if __name__ == "__main__":
    main()
