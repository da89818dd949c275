"""H=256 Triton backward tiles on the GPU: does each compile at an odd causal shape, and its
forward+backward TFLOP/s at the FlashAttention shape (T=4096). Development probe (issue 14)."""

import json
import sys

import jax
import jax.numpy as jnp

import jattn
from benchmarks import flash

rows = []
for name, bwd in {"b64_s2": (64, 64, 2), "b64_s1": (64, 64, 1), "b32_s2": (32, 32, 2)}.items():
    cfg = jattn.TritonConfig(
        block_q=64,
        block_k=64,
        num_warps=4,
        num_stages=3,
        bwd_block_q=bwd[0],
        bwd_block_k=bwd[1],
        bwd_num_warps=8,
        bwd_num_stages=bwd[2],
    )
    row = dict(config=name)
    try:
        q = jax.random.normal(jax.random.key(0), (2, 700, 4, 256), jnp.bfloat16)
        k = jax.random.normal(jax.random.key(1), (2, 900, 2, 256), jnp.bfloat16)
        g = jax.jit(
            jax.grad(
                lambda q, k, v, cfg=cfg: jnp.sum(
                    jattn.dot_product_attention(
                        q, k, v, is_causal=True, implementation="triton", config=cfg
                    ).astype(jnp.float32)
                ),
                (0, 1, 2),
            )
        )
        jax.block_until_ready(g(q, k, k))
        row["odd_causal"] = "ok"
    except Exception as e:
        row["odd_causal"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for causal in (False, True):
        try:
            shape = (4, 4096, 8, 256)
            q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
            peer = lambda q, k, v, c, cfg=cfg: jattn.dot_product_attention(
                q, k, v, is_causal=c, implementation="triton", config=cfg
            )
            ms = flash.measure(peer, q, k, v, causal, "fwd+bwd", 5)
            row[f"tflops_causal_{causal}"] = (
                3.5 * flash.forward_flops(4, 8, 4096, 4096, 256, causal) / ms / 1e9
            )
        except Exception as e:
            row[f"tflops_causal_{causal}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
