"""Pure-jnp references of every jattn op: the spec, the test oracle and the 'xla' path.

Written for clarity, not speed: attention materialises the `[B, N, T, S]` logits. Everything is
computed in float32 (float64 stays float64) at `Precision.HIGHEST`, so the reference is also a
fair oracle on GPUs whose default matmul precision is TF32. Outputs come back in the input dtype;
log-sum-exp residuals stay float32.

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
"""

import jax
import jax.numpy as jnp
from jax import Array, lax

from jattn import masking

_HIGHEST = lax.Precision.HIGHEST

# Epsilons of the official ToST code (tost_vision/tost.py, tost_lang/model_TSSA.py).
TSSA_NORM_EPS = 1e-12  # F.normalize clamps the column *norm* at this (non-causal)
TSSA_CAUSAL_SQ_EPS = 1e-12  # the causal running sum of *squares* is clamped at this
TSSA_PI_EPS = 1e-8  # added to the token-sum of Pi before dividing


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _batch_vector(x, batch: int) -> Array | None:
    """An int or a [B] array -> int32 [B] (None stays None)."""
    if x is None:
        return None
    return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch,))


def dot_product_attention(
    query: Array,  # [B, T, N, H]
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    bias: Array | None = None,  # broadcastable to [B, N, T, S]
    mask: Array | None = None,  # bool, broadcastable to [B, N, T, S]; True = attend
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,  # [B]
    key_value_seq_lengths: Array | None = None,  # [B]
    local_window_size: int | tuple[int, int] | None = None,
    q_offset: int | Array | None = None,  # int or [B]
    segment_ids: tuple[Array, Array] | None = None,  # ([B, T], [B, S])
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention exactly as the `jattn.dot_product_attention` contract states it.

    logits = softcap(scale * q.k) + bias, then every mask; softmax over keys; output = P.v.
    A query row that sees no key gets output 0 and lse -inf, and passes zero gradients back
    (`jax.nn` returns the mean of V there instead). Returns `[B, T, N, H]` and, with
    `return_residual`, the float32 log-sum-exp `[B, T, N]` of the masked logits.
    """
    batch, q_len, num_heads, head_dim = query.shape
    _, kv_len, num_kv_heads, _ = key.shape
    groups = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if isinstance(local_window_size, int):
        local_window_size = (local_window_size, local_window_size)
    q_segment_ids, kv_segment_ids = (None, None) if segment_ids is None else segment_ids

    dtype = _compute_dtype(query.dtype)
    q = query.astype(dtype).reshape(batch, q_len, num_kv_heads, groups, head_dim)
    # A key whose k or v holds NaN/inf enters the matmuls as 0 and reaches, as NaN, only the
    # rows that see it (`poison_rows`): a hidden key must not get in through 0 * NaN.
    k, v, bad_keys = masking.split_nonfinite_keys(key.astype(dtype), value.astype(dtype))

    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, precision=_HIGHEST)  # [B, K, G, T, S]
    logits = masking.soft_cap(scale * scores, logits_soft_cap)
    if bias is not None:
        logits = logits + masking.group_heads(_as_4d(bias).astype(dtype), num_kv_heads)

    visible = masking.visible_keys(
        jnp.arange(q_len),
        jnp.arange(kv_len),
        is_causal=is_causal,
        q_offset=_batch_vector(q_offset, batch),
        local_window_size=local_window_size,
        query_seq_lengths=_batch_vector(query_seq_lengths, batch),
        key_value_seq_lengths=_batch_vector(key_value_seq_lengths, batch),
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )[:, None, None]  # [B or 1, 1, 1, T, S]
    if mask is not None:
        visible = visible & masking.group_heads(_as_4d(mask), num_kv_heads)
    bad = jnp.moveaxis(bad_keys, 1, 2)[:, :, None, None]  # [B, K, 1, 1, S]
    logits = masking.poison_rows(logits, jnp.any(visible & bad, axis=-1))

    row_max, probs, row_sum = _masked_softmax_stats(logits, visible)
    probs = probs / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, precision=_HIGHEST)
    out = out.reshape(batch, q_len, num_heads, head_dim).astype(query.dtype)
    if not return_residual:
        return out
    lse = masking.safe_lse(row_max, row_sum)  # [B, K, G, T]
    lse = lse.transpose(0, 3, 1, 2).reshape(batch, q_len, num_heads)
    return out, lse


def _masked_softmax_stats(logits: Array, visible: Array) -> tuple[Array, Array, Array]:
    """Row max (finite; 0 on rows with nothing visible), unnormalised probs and their sum.

    Masked logits become -inf, so their probability is exactly 0 and so is their gradient; a row
    with nothing visible has sum 0, which callers turn into output 0 and lse -inf (never NaN).
    """
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)  # S = 0: -inf
    # The max only shifts the exponent and cancels in every result: it carries no gradient.
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    probs = jnp.exp(logits - row_max)
    return row_max[..., 0], probs, jnp.sum(probs, axis=-1)


def _as_4d(x: Array) -> Array:
    """Left-pad a bias or mask to rank 4, as `jax.nn.dot_product_attention` does."""
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def decode_attention(
    query: Array,  # [B, N, H]: one new token per sequence
    k_cache: Array,  # [B, S, K, H]
    v_cache: Array,  # [B, S, K, H]
    lengths: Array,  # [B] int: valid cache entries per sequence
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
) -> Array | tuple[Array, Array]:
    """One decode step: each sequence's query attends to the first `lengths[b]` cache entries.

    A sequence with length 0 gets output 0 and lse -inf. Returns `[B, N, H]` (and lse `[B, N]`).
    """
    result = dot_product_attention(
        query[:, None],
        k_cache,
        v_cache,
        scale=scale,
        key_value_seq_lengths=lengths,
        logits_soft_cap=logits_soft_cap,
        return_residual=return_residual,
    )
    if return_residual:
        out, lse = result
        return out[:, 0], lse[:, 0]
    return result[:, 0]


def token_statistics_attention(
    w: Array,  # [B, T, N, H]: the projected tokens
    temperature: Array,  # [N]
    *,
    causal: bool = False,
    denom_bias: Array | None = None,  # [N, L] with L >= T (causal only)
) -> Array:  # [B, T, N, H]
    """Token Statistics Self-Attention (ToST) as the official code computes it.

    The two variants are different functions, not a masked copy of each other:
    - non-causal (`tost_vision` AttentionTSSA): columns normalised over *all* tokens, with the
      eps on the norm; Pi = softmax over heads; m = Pi-weighted mean of w^2 over tokens;
    - causal (`tost_lang` CausalSelfAttention_TSSA): running sums over tokens, the eps on the
      sum of squares, a per-position `denom_bias` added to every coordinate before the head sum.
    Both return y = -Pi * w / (1 + m); the softmax over heads couples all N heads of a token.
    """
    dtype = _compute_dtype(w.dtype)
    x = w.astype(dtype)
    t = temperature.astype(dtype)[None, None, :]  # [1, 1, N]
    x_sq = x * x  # [B, T, N, H]
    if causal:
        col_sq = jnp.maximum(jnp.cumsum(x_sq, axis=1), TSSA_CAUSAL_SQ_EPS)  # [B, T, N, H]
        normed = x_sq / col_sq
        if denom_bias is not None:
            q_len = w.shape[1]
            normed = normed + denom_bias.astype(dtype)[:, :q_len].T[None, :, :, None]
        pi = jax.nn.softmax(jnp.sum(normed, axis=-1) * t, axis=-1)  # [B, T, N] over heads
        moment = jnp.cumsum(x_sq * pi[..., None], axis=1) / (
            jnp.cumsum(pi, axis=1)[..., None] + TSSA_PI_EPS
        )  # [B, T, N, H]
    else:
        col_sq = jnp.sum(x_sq, axis=1, keepdims=True)  # [B, 1, N, H]
        # == max(sqrt(col_sq), eps) (F.normalize), written so the gradient at col_sq = 0 is 0.
        col_norm = jnp.sqrt(jnp.where(col_sq > TSSA_NORM_EPS**2, col_sq, TSSA_NORM_EPS**2))
        pi = jax.nn.softmax(jnp.sum(jnp.square(x / col_norm), axis=-1) * t, axis=-1)  # [B, T, N]
        moment = jnp.sum(x_sq * pi[..., None], axis=1, keepdims=True) / (
            jnp.sum(pi, axis=1)[:, None, :, None] + TSSA_PI_EPS
        )  # [B, 1, N, H]
    y = -(x * pi[..., None]) / (1.0 + moment)
    return y.astype(w.dtype)


def segment_softmax(
    logits: Array,  # [E, ...]
    segment_ids: Array,  # [E] int: the segment (receiver node) of each edge
    num_segments: int,
) -> Array:  # [E, ...]
    """Softmax over the entries that share a segment id (jraph's `segment_softmax`).

    As jraph: a NaN or +inf logit makes its whole segment NaN, and integer logits give floats
    (the dtype `jnp.exp` gives them). Where we differ, on purpose: entries with logit -inf get
    weight 0 and a segment whose entries are all -inf gets weights 0, not NaN; ids outside
    [0, num_segments) (jraph's padding convention) get weight 0.
    """
    out_dtype = jax.eval_shape(jnp.exp, jax.ShapeDtypeStruct((), logits.dtype)).dtype
    x = logits.astype(_compute_dtype(out_dtype))
    seg_max = jax.ops.segment_max(x, segment_ids, num_segments)  # [num_segments, ...]
    # Only a segment with no finite entry (max -inf) is shifted by 0; NaN and +inf stay.
    seg_max = lax.stop_gradient(jnp.where(seg_max == -jnp.inf, 0.0, seg_max))
    in_range = (segment_ids >= 0) & (segment_ids < num_segments)
    in_range = in_range.reshape(in_range.shape + (1,) * (x.ndim - 1))
    safe_ids = jnp.clip(segment_ids, 0, num_segments - 1)
    unnormalised = jnp.where(in_range, jnp.exp(x - seg_max[safe_ids]), 0.0)
    seg_sum = jax.ops.segment_sum(unnormalised, segment_ids, num_segments)
    seg_sum = jnp.where(seg_sum == 0, 1.0, seg_sum)  # a NaN sum stays NaN
    return (unnormalised / seg_sum[safe_ids]).astype(out_dtype)
