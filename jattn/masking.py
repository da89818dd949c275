"""The masks and logit modifiers of `dot_product_attention`, shared by its XLA implementations.

Everything here works on index vectors, so the chunked implementation can build the mask of one
key block at a time and never holds a `[T, S]` matrix.

Shapes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K.
"""

import jax.numpy as jnp
from jax import Array


def visible_keys(
    q_pos: Array,  # [T] int32 row index of each query
    k_pos: Array,  # [S] int32 column index of each key
    *,
    is_causal: bool,
    q_offset: Array | None,  # [B] int32: absolute position of query row 0
    local_window_size: tuple[int, int] | None,
    query_seq_lengths: Array | None,  # [B]
    key_value_seq_lengths: Array | None,  # [B]
    q_segment_ids: Array | None,  # [B, T]
    kv_segment_ids: Array | None,  # [B, S] (the columns in k_pos)
) -> Array:  # [B or 1, T, S] bool, True where query t may see key s
    """Which keys each query sees, from the structural masks (not the user's boolean mask).

    Causal and window masks compare the absolute query position `t + q_offset` with the key
    position `s`: with `q_offset = S - T` causal attention is bottom-right aligned.
    """
    visible = jnp.ones((1, q_pos.shape[0], k_pos.shape[0]), dtype=bool)
    if is_causal or local_window_size is not None:
        offset = jnp.zeros((1,), jnp.int32) if q_offset is None else q_offset
        q_abs = q_pos[None, :, None] + offset[:, None, None]  # [B or 1, T, 1]
        k_abs = k_pos[None, None, :]  # [1, 1, S]
        if is_causal:
            visible = visible & (k_abs <= q_abs)
        if local_window_size is not None:
            left, right = local_window_size
            visible = visible & (k_abs >= q_abs - left) & (k_abs <= q_abs + right)
    if query_seq_lengths is not None:
        visible = visible & (q_pos[None, :, None] < query_seq_lengths[:, None, None])
    if key_value_seq_lengths is not None:
        visible = visible & (k_pos[None, None, :] < key_value_seq_lengths[:, None, None])
    if q_segment_ids is not None:
        visible = visible & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return visible


def soft_cap(logits: Array, cap: float | None) -> Array:
    """`cap * tanh(logits / cap)` (Gemma 2's logit soft capping); identity when cap is None."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits / cap)


def group_heads(x: Array | None, num_kv_heads: int) -> Array | None:
    """`[B', N' , T', S']` bias or mask (N' in {1, N}) -> `[B', K', G', T', S']` for grouped heads.

    Query head n = k * G + g uses kv head k, as in `jax.nn.dot_product_attention`.
    """
    if x is None:
        return None
    b, n, t, s = x.shape
    if n == 1:
        return x[:, :, None]
    return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


def split_nonfinite_keys(key: Array, value: Array) -> tuple[Array, Array, Array]:
    """(key, value with every NaN/inf key zeroed, which keys were: `[..., S, K]` bool).

    Matmuls must not meet a hidden key's NaN (0 * NaN = NaN): the kernels multiply by zeroed
    copies and poison only the rows that see a non-finite key (`poison_rows`).
    """
    bad = ~(jnp.all(jnp.isfinite(key), axis=-1) & jnp.all(jnp.isfinite(value), axis=-1))
    return (
        jnp.where(bad[..., None], jnp.zeros((), key.dtype), key),
        jnp.where(bad[..., None], jnp.zeros((), value.dtype), value),
        bad,
    )


def poison_rows(logits: Array, poisoned: Array) -> Array:
    """logits [..., T, S] with the rows in `poisoned` [..., T] made NaN: a query that sees a
    non-finite key or value gets NaN output and lse, as it would without zeroing. (Its
    gradients are not specified: NaN from the kernels' backward, 0 through this `where`.)"""
    return jnp.where(poisoned[..., None], jnp.array(jnp.nan, logits.dtype), logits)


def safe_lse(row_max: Array, row_sum: Array) -> Array:
    """log-sum-exp from (max, sum of exp(x - max)); -inf where the sum is 0, with a clean grad.

    A NaN sum (a row that sees a non-finite key) stays NaN."""
    has_keys = row_sum != 0
    return jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, row_sum, 1.0)), -jnp.inf)
