"""`implementation="mosaic"`: jattn's flash attention for Hopper on Mosaic GPU.

What `implementation=None` tries on sm_90+ when cuDNN declines (cuDNN was faster in most cells
measured on an H100). It serves the whole contract in float16 and
bfloat16 with head dims up to 256 (padded to a multiple of 64 inside). It declines, with
NotImplementedError, so that auto-dispatch moves on: float32 and float64 (the Triton kernel
serves float32), GPUs older than Hopper, and a config that does not fit shared memory. It runs
under jax_enable_x64 (its kernels' index arithmetic stays int32). The
backward has its own dq and dk/dv kernels on Mosaic GPU up to H = 128; dbias, and the backward
at larger H (whose accumulators would spill registers), come from the Triton backward.

Off the GPU an explicit `implementation="mosaic"` runs in Mosaic GPU's interpret mode (tests).
`config=None` takes the call's bucket from `jattn.autotune` (user cache, shipped table), else
`flash_mosaic.default_config`.
"""

import dataclasses
import itertools

from jax import Array

from jattn import autotune
from jattn.attention import (
    AttentionArgs,
    hopper_or_newer,
    option_kwargs,
    register_backward,
    register_implementation,
)
from pallas_kernels import common, flash_mosaic
from pallas_kernels.flash_mosaic import MosaicConfig

__all__ = ["MosaicConfig"]


def _mosaic(args: AttentionArgs, config) -> tuple[Array, Array]:
    if config is not None and not isinstance(config, MosaicConfig):
        raise NotImplementedError(f"mosaic needs a MosaicConfig, got {type(config).__name__}")
    if common.on_gpu() and not hopper_or_newer():
        raise NotImplementedError("the Mosaic GPU kernel needs a Hopper GPU (sm_90) or newer")
    tuned = None
    if config is None:  # float32 has no bucket entries: the kernel declines it itself
        tuned = autotune.lookup_call("mosaic", args.query, args.key, causal=args.is_causal)
    return flash_mosaic.flash_attention(
        args.query,
        args.key,
        args.value,
        args.bias,
        args.mask,
        config=config,
        tuned=tuned,
        **option_kwargs(args),
    )


def _mosaic_backward(args: AttentionArgs, config, out, lse, d_out, d_lse):
    if config is not None and not isinstance(config, MosaicConfig):
        raise NotImplementedError(f"mosaic needs a MosaicConfig, got {type(config).__name__}")
    if common.on_gpu() and not hopper_or_newer():
        raise NotImplementedError("the Mosaic GPU kernel needs a Hopper GPU (sm_90) or newer")
    tuned = None
    if config is None:
        tuned = autotune.lookup_call("mosaic", args.query, args.key, causal=args.is_causal)
    return flash_mosaic.flash_attention_backward(
        args.query, args.key, args.value, out, lse, d_out, d_lse, config=config, tuned=tuned,
        **option_kwargs(args),
    )  # fmt: skip


register_implementation("mosaic", _mosaic, config_type=MosaicConfig)
register_backward("mosaic", _mosaic_backward)


# --- autotuning: the forward's tiles and ring depth, then its schedule (both timed on the
# forward), then the backward's tiles (timed on forward+backward with the forward winner). What
# cannot fit shared memory or registers (`flash_mosaic.fits_registers`) is dropped.
_SPACE = dict(block_q=(64, 128), block_kv=(64, 128, 256), num_stages=(2, 3, 4))
_BACKWARD_SPACE = dict(bwd_block_q=(64, 128), bwd_block_kv=(64, 128), bwd_num_stages=(1, 2, 3))


def _forward_candidates(bucket: autotune.Bucket, base: MosaicConfig) -> list[MosaicConfig]:
    configs = [
        dataclasses.replace(base, block_q=bq, block_kv=bk, num_stages=s)
        for bq, bk, s in itertools.product(*_SPACE.values())
    ]
    return [
        c
        for c in configs
        if flash_mosaic.fits_shared_memory(
            flash_mosaic.shared_memory_estimate(c, bucket.head_dim, 0)
        )
        and flash_mosaic.fits_registers(flash_mosaic.register_tiles(c, bucket.head_dim))
    ]


def _schedule_candidates(bucket: autotune.Bucket, base: MosaicConfig) -> list[MosaicConfig]:
    """The ping-pong barrier on or off, as an mbarrier or a named barrier; a grid of one program
    per tile or a persistent one; the softmax overlap where its registers fit (measured on the
    H200 within run-to-run noise of each other in some buckets: the tuner decides per bucket)."""
    options = itertools.product((True, False), (False, True), (False, True), (False, True))
    configs = [
        dataclasses.replace(
            base,
            schedule_barrier=on,
            named_barrier=named,
            persistent=persistent,
            softmax_overlap=overlap,
        )
        for on, named, persistent, overlap in options
        if on or not named
    ]
    return [
        c
        for c in configs
        if flash_mosaic.fits_registers(flash_mosaic.register_tiles(c, bucket.head_dim))
    ]


def _backward_candidates(bucket: autotune.Bucket, base: MosaicConfig) -> list[MosaicConfig]:
    """The backward's tiles and ring depth; above H = 128 with dK, dV split by columns too (what
    keeps them in registers there: without it the Triton backward runs, not a candidate), and
    then a 2-stage dk/dv ring beside a shallower dq one. Not `bwd_fused_dq`: a tuned config
    serves `config=None` calls, which promise a deterministic backward, and the fused one adds
    dQ up in whatever order its programs run; it stays an explicit opt-in."""
    splits = (False, True) if flash_mosaic.padded_head_dim(bucket.head_dim) > 128 else (False,)
    configs = [
        dataclasses.replace(
            base,
            bwd_block_q=bq,
            bwd_block_kv=bk,
            bwd_num_stages=s,
            bwd_head_split=split,
            bwd_dkdv_stages=dkdv if dkdv != s else None,
        )
        for bq, bk, s in itertools.product(*_BACKWARD_SPACE.values())
        for split in splits
        for dkdv in ((s, 2) if split else (s,))
    ]
    configs = list(dict.fromkeys(configs))  # dkdv == s twice: once
    return [
        c
        for c in configs
        if flash_mosaic.fits_shared_memory(
            flash_mosaic.backward_shared_memory_estimate(c, bucket.head_dim, 0)
        )
        and flash_mosaic.fits_registers(flash_mosaic.backward_register_tiles(c, bucket.head_dim))
    ]


autotune.register_tunable(
    "mosaic",
    MosaicConfig,
    default=lambda bucket: flash_mosaic.default_config(bucket.head_dim, causal=bucket.causal),
    searches=[
        autotune.Search(name="forward", mode="forward", candidates=_forward_candidates),
        autotune.Search(name="schedule", mode="forward", candidates=_schedule_candidates),
        autotune.Search(name="backward", mode="forward+backward", candidates=_backward_candidates),
    ],
)
