"""Sweep xla_chunked's tile sizes on one shape: median ms of forward and forward+backward.

    python -m benchmarks.chunked_blocks --json OUT.json

Picks the defaults of `jattn.ChunkedConfig` per platform; results go under benchmarks/results/.
"""

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

import jattn
from jattn.demo import environment, median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-q", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--block-k", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    shape = (args.batch, args.length, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (jax.random.normal(key, shape, jnp.dtype(args.dtype)) for key in keys)
    rows = []
    for causal, block_q, block_k in itertools.product((True, False), args.block_q, args.block_k):
        config = jattn.ChunkedConfig(block_q=block_q, block_k=block_k)
        attention = lambda q, k, v, c=config, causal=causal: jattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla_chunked", config=c
        )
        forward = jax.jit(attention)

        @jax.jit
        def backward(q, k, v, d_out, attention=attention):
            _, vjp = jax.vjp(attention, q, k, v)
            return vjp(d_out)

        row = dict(
            causal=causal,
            block_q=block_q,
            block_k=block_k,
            forward_ms=median_ms(lambda f=forward: f(q, k, v), args.repeats),
            forward_backward_ms=median_ms(lambda b=backward: b(q, k, v, d_out), args.repeats),
        )
        rows.append(row)
        print(
            f"causal={causal!s:5} block_q={block_q:5} block_k={block_k:5} "
            f"fwd {row['forward_ms']:8.2f} ms  fwd+bwd {row['forward_backward_ms']:8.2f} ms",
            flush=True,
        )
    if args.json:
        record = dict(environment(), shape=vars(args), rows=rows)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
