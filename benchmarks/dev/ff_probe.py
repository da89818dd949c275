"""Probe: which equation of a Mosaic backward kernel fails to lower on JAX 0.11 (issue 14)."""

import sys
import traceback

import jax
import jax.numpy as jnp

import jattn


def culprit(exc):
    """The innermost equation Mosaic GPU's lowering was at, with its source line."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name == "lower_jaxpr_to_mosaic_gpu" and "eqn" in frame.f_locals:
                found = frame.f_locals["eqn"]
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    if found is None:
        return "no eqn found"
    from jax._src import source_info_util

    return f"{found}\n  at {source_info_util.summarize(found.source_info)}"


def grad_fn(causal, head_dim, const):
    d_out = jnp.ones((1, 1024, 16, head_dim), jnp.float32)

    def loss(q, k, v):
        out = jattn.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic")
        out = out.astype(jnp.float32)
        return jnp.sum(out * d_out) if const else jnp.sum(out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


for head_dim, causal, const in [
    (128, True, True),
    (128, True, False),
    (128, False, False),
    (64, True, False),
    (256, True, False),
]:
    q = jax.random.normal(jax.random.key(0), (1, 1024, 16, head_dim), jnp.bfloat16)
    try:
        jax.block_until_ready(grad_fn(causal, head_dim, const)(q, q, q))
        print(head_dim, causal, const, "OK", flush=True)
    except Exception as exc:
        print(head_dim, causal, const, "FAILED", type(exc).__name__, flush=True)
        print(culprit(exc), flush=True)
        traceback.print_exc(limit=3, file=sys.stdout)
