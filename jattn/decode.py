"""`jattn.decode_attention`: one query token per sequence against a KV cache.

The reference path for now; the split-KV Pallas kernel plugs in under `implementation=`.
"""

import jax.numpy as jnp
from jax import Array
from jaxtyping import ArrayLike

from jattn import reference
from jattn.attention import SUPPORTED_DTYPES, concrete_value

DECODE_IMPLEMENTATIONS = ("xla",)


def decode_attention(
    query: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    lengths: ArrayLike,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Decode attention: `query[b]` attends to the first `lengths[b]` entries of its cache.

    Args:
      query: `[B, N, H]`, the newest token of each sequence.
      k_cache, v_cache: `[B, S, K, H]` with N % K == 0 (GQA as in dot_product_attention).
      lengths: int `[B]`, valid entries per sequence, 0 <= lengths <= S (checked when concrete).
      scale: default H ** -0.5.
      logits_soft_cap: c: logits = c * tanh(logits / c).
      return_residual: also return the float32 log-sum-exp `[B, N]`, so that partial results
        over disjoint caches merge exactly: lse = logaddexp(lse_1, lse_2),
        out = exp(lse_1 - lse) * out_1 + exp(lse_2 - lse) * out_2.
      implementation: None or 'xla'.

    Returns:
      `[B, N, H]` (and lse). A sequence with length 0 gets output 0 and lse -inf.
    """
    if implementation not in (None, *DECODE_IMPLEMENTATIONS):
        raise ValueError(
            f"Unknown decode implementation {implementation!r}; "
            f"choose from {DECODE_IMPLEMENTATIONS}"
        )
    query, k_cache, v_cache = jnp.asarray(query), jnp.asarray(k_cache), jnp.asarray(v_cache)
    lengths = jnp.asarray(lengths)
    shapes = (
        f"query {query.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}, "
        f"lengths {lengths.shape}"
    )
    if query.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"decode_attention needs query [B, N, H] and caches [B, S, K, H] of one "
            f"shape; got {shapes}"
        )
    batch, num_heads, head_dim = query.shape
    _, capacity, num_kv_heads, _ = k_cache.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"query and caches disagree on B or H; got {shapes}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads N must be a multiple of kv heads K; got {shapes}")
    if len({query.dtype, k_cache.dtype, v_cache.dtype}) != 1 or query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"query and caches must share one float dtype; got {query.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be an integer array of shape [B] = ({batch},); "
            f"got {lengths.dtype} {lengths.shape}"
        )
    known = concrete_value(lengths)  # traced lengths cannot be checked here
    if known is not None and ((known < 0).any() or (known > capacity).any()):
        raise ValueError(f"lengths must lie in [0, S = {capacity}], got {known.tolist()}")
    if logits_soft_cap is not None and not float(logits_soft_cap) > 0:
        raise ValueError(f"logits_soft_cap must be > 0 (None turns it off), got {logits_soft_cap}")
    return reference.decode_attention(
        query,
        k_cache,
        v_cache,
        lengths.astype(jnp.int32),
        scale=scale,
        logits_soft_cap=logits_soft_cap,
        return_residual=return_residual,
    )
