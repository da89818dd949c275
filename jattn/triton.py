"""`implementation="triton"`: jattn's flash attention kernel on Pallas' Triton backend.

Runs compiled on any CUDA GPU and in Pallas interpret mode elsewhere (slow: that is how CPU
tests exercise it; `implementation=None` never picks it off a GPU). Serves the whole contract in
float16, bfloat16 and float32; declines float64 and head dims above 256. `config=None` takes the
tuned config of the call's bucket from `jattn.autotune` (user cache, then the shipped table for
this GPU), else `flash_triton.default_config`; either is shrunk to fit shared memory. The kernel
registers its search space here: `jattn autotune --implementation triton`.
"""

import dataclasses
import itertools

from jax import Array

from jattn import autotune
from jattn.attention import (
    AttentionArgs,
    option_kwargs,
    register_backward,
    register_implementation,
)
from pallas_kernels import common, flash_triton
from pallas_kernels.flash_triton import TritonConfig

__all__ = ["TritonConfig"]


def _triton(args: AttentionArgs, config) -> tuple[Array, Array]:
    if config is not None and not isinstance(config, TritonConfig):
        raise NotImplementedError(f"triton needs a TritonConfig, got {type(config).__name__}")
    tuned = None
    if config is None:  # the autotune cache or the shipped table for this GPU and bucket
        tuned = autotune.lookup_call("triton", args.query, args.key, causal=args.is_causal)
    return flash_triton.flash_attention(
        args.query,
        args.key,
        args.value,
        args.bias,
        args.mask,
        config=config,
        tuned=tuned,
        **option_kwargs(args),
    )


def _triton_backward(args: AttentionArgs, config, out, lse, d_out, d_lse):
    if config is not None and not isinstance(config, TritonConfig):
        raise NotImplementedError(f"triton needs a TritonConfig, got {type(config).__name__}")
    flash_triton.check_served(args.query)
    dq, dk, dv, _ = flash_triton.backward(
        args.query, args.key, args.value, None, None, out, lse, d_out, d_lse, want_dbias=False,
        config=config, **option_kwargs(args),
    )  # fmt: skip
    return dq, dk, dv


register_implementation("triton", _triton, config_type=TritonConfig)
register_backward("triton", _triton_backward)


# --- autotuning: the forward tiles (timed on the forward), then the backward tiles (timed on
# forward+backward with the forward winner); candidates that cannot fit shared memory are dropped.
_FORWARD_SPACE = dict(block_q=(64, 128), block_k=(32, 64, 128), warps=(4, 8), stages=(2, 3, 4))
_BACKWARD_SPACE = dict(block_q=(32, 64, 128), block_k=(32, 64, 128), warps=(4, 8), stages=(2, 3))


def _fits(bucket: autotune.Bucket, block_q: int, block_k: int, stages: int) -> bool:
    budget = common.shared_memory_bytes()  # None off the GPU: nothing to prune
    itemsize = 4 if bucket.dtype == "float32" else 2
    need = flash_triton._shared_memory_estimate(
        block_q, block_k, stages, bucket.head_dim, itemsize, 0
    )
    return budget is None or need <= budget


def _forward_candidates(bucket: autotune.Bucket, base: TritonConfig) -> list[TritonConfig]:
    space = _FORWARD_SPACE
    return [
        dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=w, num_stages=s)
        for bq, bk, w, s in itertools.product(*space.values())
        if _fits(bucket, bq, bk, s)
    ]


def _backward_candidates(bucket: autotune.Bucket, base: TritonConfig) -> list[TritonConfig]:
    space = _BACKWARD_SPACE
    return [  # dq kernel: 2 * bq rows resident, bk streamed; dk/dv: the roles swapped
        dataclasses.replace(base, bwd_block_q=bq, bwd_block_k=bk, bwd_num_warps=w, bwd_num_stages=s)
        for bq, bk, w, s in itertools.product(*space.values())
        if _fits(bucket, 2 * bq, bk, s) and _fits(bucket, 2 * bk, bq, s)
    ]


autotune.register_tunable(
    "triton",
    TritonConfig,
    default=lambda bucket: flash_triton.default_config(bucket.head_dim, bucket.dtype),
    searches=[
        autotune.Search(name="forward", mode="forward", candidates=_forward_candidates),
        autotune.Search(name="backward", mode="forward+backward", candidates=_backward_candidates),
    ],
)
