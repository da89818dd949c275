"""Sweep the Triton flash kernel's tiles and launch parameters per head dim (fixes its defaults).

    python -m benchmarks.triton_configs --json benchmarks/results/triton_configs_h100.json

Forward candidates are timed on the forward alone; backward candidates on forward+backward with
the default forward config. FlashAttention shapes (16k tokens, hidden 2048), bf16.
"""

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

import jattn
from benchmarks.flash import HIDDEN, TOKENS, time_ms
from jattn.demo import environment
from pallas_kernels import flash_triton

# (block_q, block_k, num_warps, num_stages)
FORWARD = [
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (128, 32, 4, 3),
    (64, 32, 4, 2),
    (64, 32, 8, 2),
]
BACKWARD = [
    (64, 64, 4, 2),
    (64, 64, 8, 2),
    (64, 64, 4, 3),
    (64, 128, 8, 2),
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (32, 64, 4, 2),
    (32, 32, 4, 2),
    (32, 32, 8, 2),
    (64, 32, 8, 2),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for head_dim in args.head_dims:
        batch, heads = TOKENS // args.length, HIDDEN // head_dim
        shape = (batch, args.length, heads, head_dim)
        keys = jax.random.split(jax.random.key(head_dim), 3)
        q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
        base = flash_triton.default_config(head_dim, jnp.bfloat16)
        for causal in (False, True):
            candidates = [("fwd", c) for c in FORWARD] + [("fwd+bwd", c) for c in BACKWARD]
            for mode, (bq, bk, warps, stages) in candidates:
                if mode == "fwd":
                    config = dataclasses.replace(
                        base, block_q=bq, block_k=bk, num_warps=warps, num_stages=stages
                    )
                else:
                    config = dataclasses.replace(
                        base,
                        bwd_block_q=bq,
                        bwd_block_k=bk,
                        bwd_num_warps=warps,
                        bwd_num_stages=stages,
                    )

                def attend(q, k, v, config=config, causal=causal):
                    return jattn.dot_product_attention(
                        q, k, v, is_causal=causal, implementation="triton", config=config
                    )

                if mode == "fwd":
                    fn = jax.jit(attend)
                else:
                    fn = jax.jit(
                        jax.grad(
                            lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                            argnums=(0, 1, 2),
                        )
                    )
                row = dict(
                    head_dim=head_dim, causal=causal, mode=mode, config=[bq, bk, warps, stages]
                )
                try:
                    row["ms"] = time_ms(fn, (q, k, v), args.repeats)
                except Exception as e:  # out of shared memory / registers: record and go on
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment(), length=args.length, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
