"""`jattn.token_statistics_attention`: Token Statistics Self-Attention (ToST, ICLR 2025).

Linear in T. Two implementations: 'triton', the fused Pallas kernels of `pallas_kernels.tssa`
(three passes over w forward and over (w, dy) backward, float32 accumulation; compiled on a GPU,
in Pallas interpret mode elsewhere), and 'xla', the jnp reference (`jattn.reference`) compiled by
XLA. None picks 'triton' on a GPU and 'xla' elsewhere (interpret mode is for tests, not speed).
"""

import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike

from jattn import reference
from pallas_kernels import tssa as tssa_kernels
from pallas_kernels.tssa import Config as TSSAConfig

TSSA_IMPLEMENTATIONS = ("triton", "xla")
_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def token_statistics_attention(
    w: ArrayLike,
    temperature: ArrayLike,
    *,
    causal: bool = False,
    denom_bias: ArrayLike | None = None,
    implementation: str | None = None,
    config: TSSAConfig | None = None,
) -> Array:
    """TSSA on projected tokens, matching the official ToST code (both variants).

    Args:
      w: `[B, T, N, H]`, the tokens after ToST's single projection (the module owns it).
      temperature: `[N]`, the per-head softmax temperature (ToST's `temp`, initialised to 1).
      causal: False: the vision operator (statistics over all T tokens); True: the language
        operator (running statistics over tokens 0..t). They are different functions.
      denom_bias: causal only: `[N, L]` with L >= T, the learnable per-position bias added to
        every coordinate of the normalised squares (ToST's `denom_bias`, zeros at init).
      implementation: None (auto: 'triton' on a GPU for float16/bfloat16/float32, else 'xla'),
        'triton' (the fused Pallas kernels; in interpret mode off the GPU) or 'xla'.
      config: tiling of the 'triton' kernels (`pallas_kernels.tssa.Config`); None: heuristics.

    Returns:
      `[B, T, N, H]`: y = -Pi * w / (1 + m), Pi a softmax over the N heads of each token. An
      empty w (B, T, N or H = 0) gives an empty output.

    Raises:
      ValueError: w not `[B, T, N, H]` float, temperature not `[N]`, denom_bias not `[N, L]`
        with L >= T, or denom_bias without causal.
      NotImplementedError: implementation='triton' with float64 w (the kernels accumulate in
        float32; 'xla' serves float64).
    """
    if implementation not in (None, *TSSA_IMPLEMENTATIONS):
        raise ValueError(
            f"Unknown TSSA implementation {implementation!r}; choose from {TSSA_IMPLEMENTATIONS}"
        )
    if config is not None and not isinstance(config, TSSAConfig):
        raise ValueError(
            f"config must be a TSSA config (pallas_kernels.tssa.Config), got "
            f"{type(config).__name__}"
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
    if w.size == 0:  # B, T, N or H = 0: nothing to attend over, the same for every implementation
        return jnp.zeros(w.shape, w.dtype)
    if implementation is None:
        on_gpu = jax.default_backend() == "gpu"
        implementation = "triton" if on_gpu and w.dtype != jnp.float64 else "xla"
    if implementation == "triton" and w.dtype == jnp.float64:
        raise NotImplementedError(
            "jattn's TSSA 'triton' kernels compute in float32; for float64 w use "
            "implementation='xla' (auto picks it)"
        )
    if implementation == "triton":
        return tssa_kernels.token_statistics_attention(
            w, temperature, causal=causal, denom_bias=denom_bias, config=config
        )
    return reference.token_statistics_attention(
        w, temperature, causal=causal, denom_bias=denom_bias
    )
