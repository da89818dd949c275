"""jattn's cuDNN path against jax.nn's own call: what asking for the lse costs, how coarse it is.

A lead from stop 39 (issue 14): `jattn/cudnn.py` always calls `jax.nn.dot_product_attention(...,
return_residual=True)`. In JAX that runs cuDNN's forward in training mode (it writes the softmax
statistics) and then transposes the lse and casts it to the input dtype. In stop 39's auto
check, auto's cuDNN call ran about 3% behind jax.nn's own call at T = 1k. Per cell (bf16,
causal, FlashAttention shapes), forward only, in one process:
- "nn": jax.nn with cuDNN, output only;
- "nn_residual": the same call with return_residual=True (output and lse);
- "jattn_cudnn": jattn.dot_product_attention(implementation="cudnn");
- "jattn_cudnn_residual": the same with return_residual=True (jattn's float32 lse path);
- "jattn_auto": jattn with implementation=None.
Then the lse that jax.nn returns, and the one jattn's cudnn implementation returns to ring
attention (stop 40: float32, from the cuDNN wrapper under jax.nn), against a float32 lse
(`jattn.reference`): the largest absolute difference and the largest relative error it would
put into a merge weight exp(lse - lse_true), with which ring attention merges partial outputs.

Run: python -m benchmarks.dev.cudnn_residual_ab --json OUT.json [--head-dims 64 128]
     [--lengths 1024 4096]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jattn
from benchmarks import flash
from jattn import attention, reference


def _fns(causal: bool) -> dict:
    def nn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    def nn_residual(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn", return_residual=True
        )

    def jattn_call(implementation):
        return lambda q, k, v: jattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )

    def jattn_residual(q, k, v):
        return jattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn", return_residual=True
        )

    fns = dict(
        nn=nn,
        nn_residual=nn_residual,
        jattn_cudnn=jattn_call("cudnn"),
        jattn_cudnn_residual=jattn_residual,
        jattn_auto=jattn_call(None),
    )
    return {name: jax.jit(fn) for name, fn in fns.items()}


def lse_error(q, k, v, causal: bool, source: str) -> dict:
    """A cuDNN lse against the float32 reference on the first batch row: jax.nn's ("nn") or
    the one jattn's implementation hands ring attention ("jattn", `attention._run`)."""
    q, k, v = q[:1], k[:1], v[:1]
    if source == "nn":
        _, lse = jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn", return_residual=True
        )  # [1, T, N] in q's dtype
    else:
        args = attention.check_attention_args(q, k, v, is_causal=causal)
        _, lse = attention._run(args, "cudnn", None)  # [1, T, N] float32
    _, want = reference.dot_product_attention(q, k, v, is_causal=causal, return_residual=True)
    diff = jnp.abs(lse.astype(jnp.float32) - want)
    return dict(
        lse_dtype=str(lse.dtype),
        lse_max_abs_error=float(jnp.max(diff)),
        merge_weight_max_rel_error=float(jnp.expm1(jnp.max(diff))),
        lse_max=float(jnp.max(want)),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    rows = []
    for head_dim in args.head_dims:
        for length in args.lengths:
            q, k, v = flash.qkv(length, head_dim)
            cell = dict(head_dim=head_dim, length=length, causal=True, mode="fwd")
            for source in ("nn", "jattn"):
                error = lse_error(q, k, v, True, source)
                rows.append(dict(cell, peer=f"lse_error_{source}", **error))
            flash.record_together(_fns(True), (q, k, v), args.repeats, cell, rows, args.json)


if __name__ == "__main__":
    main()
