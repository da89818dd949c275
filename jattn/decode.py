"""`jattn.decode_attention`: one query token per sequence against a KV cache.

Implementations: 'triton', the split-KV Pallas kernel (`pallas_kernels/decode.py`: GQA-packed,
S split across programs and merged by log-sum-exp, contiguous or paged cache), and 'xla', the
pure-jnp reference. Auto picks 'triton' on a CUDA GPU and 'xla' elsewhere; asking for 'triton'
without a GPU runs the kernel in Pallas interpret mode (how the CPU tests exercise it).
"""

import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import ArrayLike

from jattn import reference
from jattn.attention import SUPPORTED_DTYPES, _as_int32, _static_number, concrete_value
from pallas_kernels import common as kernel_common
from pallas_kernels import decode as decode_kernel
from pallas_kernels.decode import DecodeConfig

DECODE_IMPLEMENTATIONS = ("triton", "xla")


def decode_attention(
    query: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    lengths: ArrayLike,
    *,
    page_table: ArrayLike | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    implementation: str | None = None,
    config: DecodeConfig | None = None,
) -> Array | tuple[Array, Array]:
    """Decode attention: `query[b]` attends to the first `lengths[b]` entries of its cache.

    Args:
      query: `[B, N, H]`, the newest token of each sequence.
      k_cache, v_cache: `[B, S, K, H]` with N % K == 0 (GQA as in dot_product_attention); with
        `page_table`, page pools `[P, page_size, K, H]`.
      lengths: int `[B]`, valid entries per sequence, 0 <= lengths <= S (checked when concrete;
        traced lengths are clipped to [0, S]). With a paged cache S = pages * page_size.
      page_table: optional int `[B, pages]`: entry i of sequence b lives at
        `k_cache[page_table[b, i // page_size], i % page_size]`. Pages past a sequence's length
        are never read (their entries may hold anything), and neither are slots past it.
        An in-use entry outside [0, P) raises ValueError when the table and lengths are
        concrete; when traced, it is clamped for the read (memory outside the pool is never
        touched) and that sequence's output and lse are NaN, on every implementation.
      scale: default H ** -0.5.
      logits_soft_cap: c: logits = c * tanh(logits / c).
      return_residual: also return the float32 log-sum-exp `[B, N]`, so that partial results
        over disjoint caches merge exactly: lse = logaddexp(lse_1, lse_2),
        out = exp(lse_1 - lse) * out_1 + exp(lse_2 - lse) * out_2.
      implementation: None (auto), 'triton' or 'xla'. An implementation that cannot serve the
        call raises NotImplementedError; auto then falls back to 'xla'.
      config: `DecodeConfig` tiling for 'triton' (None: the H100-tuned default).

    Returns:
      `[B, N, H]` (and lse). A sequence with length 0 gets output 0 and lse -inf; so does every
      sequence of an empty cache (S = 0). B = 0 or N = 0 give empty results; H = 0 raises.
    """
    if implementation not in (None, *DECODE_IMPLEMENTATIONS):
        raise ValueError(
            f"Unknown decode implementation {implementation!r}; "
            f"choose from {DECODE_IMPLEMENTATIONS}"
        )
    query, k_cache, v_cache = jnp.asarray(query), jnp.asarray(k_cache), jnp.asarray(v_cache)
    lengths = _as_int32(lengths, "lengths")  # int64 is range-checked, never wrapped
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
    if page_table is not None:
        page_table = _as_int32(page_table, "page_table")
        shapes += f", page_table {page_table.shape}"
        if page_table.ndim != 2 or page_table.shape[0] != batch:
            raise ValueError(f"page_table must be [B, pages] with B = {batch}; got {shapes}")
        capacity = page_table.shape[1] * k_cache.shape[1]  # pages * page_size
    elif k_cache.shape[0] != batch:
        raise ValueError(f"query and caches disagree on B; got {shapes}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"query and caches disagree on H; got {shapes}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads N must be a multiple of kv heads K; got {shapes}")
    if len({query.dtype, k_cache.dtype, v_cache.dtype}) != 1 or query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"query and caches must share one float dtype; got {query.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be an integer array of shape [B] = ({batch},); {shapes}")
    known = concrete_value(lengths)  # traced lengths cannot be checked here
    if known is not None and ((known < 0).any() or (known > capacity).any()):
        raise ValueError(f"lengths must lie in [0, S = {capacity}], got {known.tolist()}")
    scale = _static_number(scale, "scale")
    logits_soft_cap = _static_number(logits_soft_cap, "logits_soft_cap")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be > 0 (None turns it off), got {logits_soft_cap}")
    if config is not None and not isinstance(config, DecodeConfig):
        raise ValueError(
            f"decode_attention takes a DecodeConfig, got a {type(config).__name__} "
            "(the config of another kernel)"
        )
    lengths = lengths.astype(jnp.int32)
    if head_dim == 0:
        raise ValueError(f"the head dim H must be >= 1; got {shapes}")
    bad_pages = None
    if page_table is not None:
        page_table = _check_page_table(page_table, k_cache.shape, shapes, known)
        # A traced table can still point outside the pool: both paths read a clamped page
        # (never memory outside the pool) and give that sequence NaN (like jnp.take's fill).
        bad_pages = _sequences_with_bad_pages(page_table, lengths, k_cache.shape)
        page_table = jnp.clip(page_table, 0, max(k_cache.shape[0] - 1, 0))
    if 0 in (batch, num_heads, capacity, k_cache.shape[0]):  # nothing to read: no key is seen
        out = jnp.zeros((batch, num_heads, head_dim), query.dtype)
        lse = jnp.full((batch, num_heads), -jnp.inf, jnp.float32)
    else:
        out, lse = _serve(
            query,
            k_cache,
            v_cache,
            lengths,
            page_table,
            scale,
            logits_soft_cap,
            implementation,
            config,
            head_dim,
        )
    if bad_pages is not None:
        out = jnp.where(bad_pages[:, None, None], jnp.nan, out).astype(out.dtype)
        lse = jnp.where(bad_pages[:, None], jnp.nan, lse)
    return (out, lse) if return_residual else out


def _serve(
    query,
    k_cache,
    v_cache,
    lengths,
    page_table,
    scale,
    logits_soft_cap,
    implementation,
    config,
    head_dim,
) -> tuple[Array, Array]:
    order = [implementation] if implementation else ["triton", "xla"]
    if implementation is None and not kernel_common.on_gpu():
        order = ["xla"]  # interpret mode is for tests, not for use
    for name in order:
        try:
            if name == "triton":
                decode_kernel.check_supported(
                    k_cache.shape,
                    head_dim,
                    None if page_table is None else k_cache.shape[1],
                    dtype=query.dtype,
                )
                out, lse = decode_kernel.decode_attention(
                    query,
                    k_cache,
                    v_cache,
                    lengths,
                    page_table=page_table,
                    scale=scale,
                    logits_soft_cap=logits_soft_cap,
                    config=config,
                )
                return out, lse
        except NotImplementedError:
            if implementation is not None:
                raise
            continue
        if page_table is not None:  # gather the pages into a contiguous cache
            k_cache, v_cache = (_gather_pages(c, page_table) for c in (k_cache, v_cache))
        return reference.decode_attention(
            query,
            k_cache,
            v_cache,
            lengths,
            scale=scale,
            logits_soft_cap=logits_soft_cap,
            return_residual=True,
        )
    raise AssertionError("unreachable: 'xla' serves every call")


def _gather_pages(pool: Array, page_table: Array) -> Array:
    """`[P, page_size, K, H]` pages in `page_table` `[B, pages]` order -> `[B, S, K, H]`."""
    batch, pages = page_table.shape
    return pool[page_table].reshape(batch, pages * pool.shape[1], *pool.shape[2:])


def _sequences_with_bad_pages(page_table: Array, lengths: Array, pool_shape) -> Array:
    """[B] bool: the sequences with an in-use page_table entry outside [0, P)."""
    pool, page_size = pool_shape[0], pool_shape[1]
    used = jnp.arange(page_table.shape[1])[None, :] * page_size < lengths[:, None]
    return jnp.any(used & ((page_table < 0) | (page_table >= pool)), axis=1)


def _check_page_table(page_table, pool_shape, shapes, known_lengths) -> Array:
    if not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(f"page_table must hold integers, got {page_table.dtype}")
    table = concrete_value(page_table)
    if table is not None and known_lengths is not None:
        page_size = pool_shape[1]
        used = np.arange(table.shape[1])[None, :] * page_size < known_lengths[:, None]
        if ((table < 0) | (table >= pool_shape[0]))[used].any():
            raise ValueError(
                f"page_table entries in use must lie in [0, P = {pool_shape[0]}); {shapes}"
            )
    return page_table.astype(jnp.int32)
