"""`jattn.token_statistics_attention`: Token Statistics Self-Attention (ToST, ICLR 2025).

Linear in T. The reference path for now; the fused Pallas kernels plug in under
`implementation=`.
"""

import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike

from jattn import reference

TSSA_IMPLEMENTATIONS = ("xla",)
_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def token_statistics_attention(
    w: ArrayLike,
    temperature: ArrayLike,
    *,
    causal: bool = False,
    denom_bias: ArrayLike | None = None,
    implementation: str | None = None,
) -> Array:
    """TSSA on projected tokens, matching the official ToST code (both variants).

    Args:
      w: `[B, T, N, H]`, the tokens after ToST's single projection (the module owns it).
      temperature: `[N]`, the per-head softmax temperature (ToST's `temp`, initialised to 1).
      causal: False: the vision operator (statistics over all T tokens); True: the language
        operator (running statistics over tokens 0..t). They are different functions.
      denom_bias: causal only: `[N, L]` with L >= T, the learnable per-position bias added to
        every coordinate of the normalised squares (ToST's `denom_bias`, zeros at init).
      implementation: None or 'xla'.

    Returns:
      `[B, T, N, H]`: y = -Pi * w / (1 + m), Pi a softmax over the N heads of each token.
    """
    if implementation not in (None, *TSSA_IMPLEMENTATIONS):
        raise ValueError(
            f"Unknown TSSA implementation {implementation!r}; choose from {TSSA_IMPLEMENTATIONS}"
        )
    w, temperature = jnp.asarray(w), jnp.asarray(temperature)
    if w.ndim != 4 or w.dtype not in _DTYPES:
        raise ValueError(f"w must be a float array [B, T, N, H], got {w.dtype} {w.shape}")
    num_heads = w.shape[2]
    if temperature.shape != (num_heads,):
        raise ValueError(
            f"temperature must have shape [N] = ({num_heads},), got "
            f"{temperature.shape} (w {w.shape})"
        )
    if denom_bias is not None:
        if not causal:
            raise ValueError("denom_bias belongs to the causal variant; pass causal=True")
        denom_bias = jnp.asarray(denom_bias)
        if denom_bias.ndim != 2 or denom_bias.shape[0] != num_heads:
            raise ValueError(
                f"denom_bias must have shape [N, L] = ({num_heads}, L), got {denom_bias.shape}"
            )
        if denom_bias.shape[1] < w.shape[1]:
            raise ValueError(
                f"T = {w.shape[1]} is longer than denom_bias {denom_bias.shape} "
                "covers (L must be >= T)"
            )
    return reference.token_statistics_attention(
        w, temperature, causal=causal, denom_bias=denom_bias
    )
