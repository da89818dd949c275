"""What the Pallas kernels share: where they run, padding, and Triton compiler parameters.

Every kernel here runs compiled on a CUDA GPU and in Pallas interpret mode anywhere else (CPU
tests and CI). `interpret_mode()` is the one place that decides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def interpret_mode() -> bool:
    """Run Pallas kernels in interpret mode: everywhere except on a GPU."""
    return not on_gpu()


def triton_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    """Triton compiler parameters (ignored in interpret mode)."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def padded_head_dim(head_dim: int) -> int:
    """The head dim a Triton kernel computes with: the next power of two, at least 16.

    Triton tiles need power-of-two extents and tensor-core dots need >= 16; zero columns add
    nothing to q.k or to p.v, so padding H changes no result.
    """
    return max(16, 1 << (head_dim - 1).bit_length())


def pad_last(x: jax.Array, size: int) -> jax.Array:
    """Zero-pad the last axis of x to `size`."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
