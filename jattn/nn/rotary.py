"""Rotary position embeddings (RoPE, Su et al. 2021), the rotate-half form of GPT-NeoX and Llama.

Coordinate c < H/2 of a head is paired with c + H/2 and the pair is rotated by the angle
`position * base ** (-2c / H)`, so q.k depends only on the relative position of the two tokens.
"""

import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike


def rotary_angles(positions: ArrayLike, head_dim: int, base: float = 10_000.0) -> Array:
    """`[..., H/2]` float32 angles for integer `positions [...]`."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [H/2]
    positions = jnp.asarray(positions, jnp.float32)
    return positions[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))


def apply_rotary(x: ArrayLike, positions: ArrayLike, base: float = 10_000.0) -> Array:
    """Rotate `x [B, T, heads, H]` by its token positions `[B, T]` (or `[T]`); same dtype out.

    Example:
      >>> x = jnp.ones((1, 3, 2, 4))
      >>> bool(jnp.allclose(apply_rotary(x, jnp.zeros(3, jnp.int32)), x))  # position 0: identity
      True
    """
    x = jnp.asarray(x)
    positions = jnp.asarray(positions)
    if x.ndim != 4 or positions.shape not in ((x.shape[1],), (1, x.shape[1]), x.shape[:2]):
        raise ValueError(
            f"apply_rotary needs x [B, T, heads, H] and positions [B, T] or [T]; got x "
            f"{x.shape}, positions {positions.shape}"
        )
    if positions.ndim == 1:
        positions = positions[None]
    angles = rotary_angles(positions, x.shape[-1], base)[:, :, None, :]  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
