"""Probe (issue 16): can Mosaic GPU (Pallas) lower what flex_attention needs in its forward?
(a) a block list read from shared memory as scalars (a loop bound, a TMA index),
(b) a user mask_mod / score_mod vmapped over a WGMMA-layout tile.
Lowered for CUDA on a CPU machine (export), as tests/test_flash_mosaic.py does; prints whether
it lowered. Findings in benchmarks/NOTES.md (flex_attention on the H200).

    python -m benchmarks.dev.flex_mosaic_probe
"""

import jax
import jax.numpy as jnp
from jax import export, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_common import WGMMA, tiled

BQ, BK = 64, 128


def mask_mod(b, h, q, k):
    return (jnp.abs(q - k) < 100) | (k < 4)


def score_mod(s, b, h, q, k):
    slope = jnp.exp2(-8.0 * (h + 1) / 16)
    return s - slope * jnp.abs(q - k).astype(jnp.float32)


def kernel(ids_ref, x_ref, o_ref):  # ids [8] int32 GMEM, x [8*BK, 64] GMEM, o [BQ, BK] f32
    def body(ids_smem, x_smem, o_smem, bar):
        plgpu.copy_gmem_to_smem(ids_ref, ids_smem, bar)
        plgpu.barrier_wait(bar)
        n = ids_smem[0]  # (a) scalar read from SMEM
        h = lax.axis_index("h")

        def step(j, acc):
            blk = ids_smem[1 + j]  # (a) dynamic scalar read, used as a TMA index
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(blk * BK, BK)], x_smem, bar)
            plgpu.barrier_wait(bar)
            q_idx = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (BQ, BK), 0), WGMMA)
            k_idx = (
                plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (BQ, BK), 1), WGMMA) + blk * BK
            )
            s = plgpu.layout_cast(jnp.zeros((BQ, BK), jnp.float32), WGMMA)
            full = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731  (over full [BQ, BK] tiles)
            s = full(lambda s, q, k: score_mod(s, 0, h, q, k))(s, q_idx, k_idx)  # (b)
            vis = full(lambda q, k: mask_mod(0, h, q, k))(q_idx, k_idx)  # (b)
            return acc + jnp.where(vis, s, 0.0)

        acc = plgpu.layout_cast(jnp.zeros((BQ, BK), jnp.float32), WGMMA)
        acc = lax.fori_loop(0, n, step, acc)
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref)
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        body,
        plgpu.SMEM((32,), jnp.int32),
        tiled((BK, 64), jnp.bfloat16),
        plgpu.SMEM((BQ, BK), jnp.float32),
        plgpu.Barrier(num_arrivals=1),
    )


def run(ids, x):
    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((BQ, BK), jnp.float32), grid=(2,), grid_names=("h",)
    )(ids, x)


if __name__ == "__main__":
    ids = jax.ShapeDtypeStruct((32,), jnp.int32)  # a TMA moves multiples of 128 bytes
    x = jax.ShapeDtypeStruct((8 * BK, 64), jnp.bfloat16)
    text = export.export(jax.jit(run), platforms=["cuda"])(ids, x).mlir_module()
    print("lowered:", "mosaic_gpu" in text, len(text))
