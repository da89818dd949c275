"""`implementation="xla_chunked"`: online-softmax attention over key blocks, in plain XLA.

Forward: a `lax.scan` over key blocks carries the running row max, row sum and output (the
FlashAttention recurrence), so memory is O(T * block_k) instead of O(T * S). Backward: a second
scan recomputes each block's probabilities from the saved log-sum-exp (FlashAttention-2 §3.1.1)
and accumulates dq, emitting dk, dv (and dbias) block by block: the `[T, S]` matrix is never
stored in either direction. Serves every feature of the contract; runs anywhere XLA does.

Matmul operands stay in the input dtype (probabilities and score gradients are rounded to it, as
flash kernels do) with float32 accumulation; softmax statistics are float32 throughout.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from jattn import masking

_HIGHEST = lax.Precision.HIGHEST


def _matmul(spec: str, a: Array, b: Array) -> Array:
    """einsum in the operands' dtype, accumulated in (at least) float32."""
    acc = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return jnp.einsum(spec, a, b, precision=_HIGHEST, preferred_element_type=acc)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChunkedConfig:
    """Tiling of the chunked implementation.

    block_k: keys per scan step; S is padded up to a multiple (padded keys are masked out).
    """

    block_k: int = 512

    def __post_init__(self):
        if self.block_k < 1:
            raise ValueError(f"block_k must be >= 1, got {self.block_k}")


class _Static(NamedTuple):
    """Everything about a call that is not an array: it keys the custom_vjp closure."""

    scale: float
    is_causal: bool
    local_window_size: tuple[int, int] | None
    logits_soft_cap: float | None
    block_k: int
    kv_len: int  # S before padding


class _Aux(NamedTuple):
    """Non-differentiable arrays (None where absent)."""

    mask: Array | None  # [B', N', T', S'] bool
    q_offset: Array | None  # [B] int32
    query_seq_lengths: Array | None  # [B]
    key_value_seq_lengths: Array | None  # [B]
    q_segment_ids: Array | None  # [B, T]
    kv_segment_ids: Array | None  # [B, S]


def chunked_attention(
    query: Array,  # [B, T, N, H]
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    bias: Array | None,  # [B', N', T', S'] broadcastable to [B, N, T, S]
    mask: Array | None,  # [B', N', T', S'] bool
    *,
    scale: float,
    is_causal: bool,
    q_offset: Array | None,
    query_seq_lengths: Array | None,
    key_value_seq_lengths: Array | None,
    local_window_size: tuple[int, int] | None,
    segment_ids: tuple[Array, Array] | None,
    logits_soft_cap: float | None,
    config: ChunkedConfig,
) -> tuple[Array, Array]:  # [B, T, N, H] in query.dtype, lse [B, T, N] float32
    """Attention with validated, rank-4 inputs (see `jattn.dot_product_attention`)."""
    block_k = min(config.block_k, key.shape[1])
    static = _Static(
        float(scale), is_causal, local_window_size, logits_soft_cap, block_k, key.shape[1]
    )
    q_ids, kv_ids = (None, None) if segment_ids is None else segment_ids
    aux = _Aux(mask, q_offset, query_seq_lengths, key_value_seq_lengths, q_ids, kv_ids)
    return _attention_vjp(static)(query, key, value, bias, aux)


@functools.cache
def _attention_vjp(static: _Static):
    @jax.custom_vjp
    def attention(query, key, value, bias, aux):
        return _forward(static, query, key, value, bias, aux)

    def forward_rule(query, key, value, bias, aux):
        out, lse = _forward(static, query, key, value, bias, aux)
        return (out, lse), (query, key, value, bias, aux, out, lse)

    def backward_rule(residuals, cotangents):
        return _backward(static, *residuals, *cotangents)

    attention.defvjp(forward_rule, backward_rule)
    return attention


def _pad_keys(x: Array | None, axis: int, padded_len: int) -> Array | None:
    """Zero-pad the key axis of x up to padded_len (broadcast axes of size 1 stay as they are)."""
    if x is None or x.shape[axis] in (1, padded_len):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded_len - x.shape[axis])
    return jnp.pad(x, widths)


def _key_block(x: Array | None, axis: int, start: Array, block_k: int) -> Array | None:
    """Columns [start, start + block_k) of x along axis (a broadcast axis of size 1 as is)."""
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, block_k, axis)


class _Padded(NamedTuple):
    key: Array  # [B, S_pad, K, H] input dtype
    value: Array  # [B, S_pad, K, H]
    bias: Array | None  # [B', K', G', T', S' or S_pad]
    mask: Array | None  # [B', K', G', T', S' or S_pad]
    kv_segment_ids: Array | None  # [B, S_pad]
    num_blocks: int


def _prepare(static: _Static, query, key, value, bias, aux) -> tuple[Array, _Padded]:
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    num_blocks = -(-static.kv_len // static.block_k)
    padded = num_blocks * static.block_k
    q = query.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    grouped_bias = None if bias is None else masking.group_heads(bias.astype(dtype), num_kv_heads)
    return q, _Padded(
        key=_pad_keys(key, 1, padded),
        value=_pad_keys(value, 1, padded),
        bias=_pad_keys(grouped_bias, 4, padded),
        mask=_pad_keys(masking.group_heads(aux.mask, num_kv_heads), 4, padded),
        kv_segment_ids=_pad_keys(aux.kv_segment_ids, 1, padded),
        num_blocks=num_blocks,
    )


def _block_visible(static: _Static, q_len: int, padded: _Padded, aux: _Aux, start):
    """Which queries see which keys of block [start, start + block_k): [B', K', G', T, bk] bool."""
    k_pos = start + jnp.arange(static.block_k)
    visible = masking.visible_keys(
        jnp.arange(q_len),
        k_pos,
        is_causal=static.is_causal,
        q_offset=aux.q_offset,
        local_window_size=static.local_window_size,
        query_seq_lengths=aux.query_seq_lengths,
        key_value_seq_lengths=aux.key_value_seq_lengths,
        q_segment_ids=aux.q_segment_ids,
        kv_segment_ids=_key_block(padded.kv_segment_ids, 1, start, static.block_k),
    )
    visible = visible & (k_pos < static.kv_len)[None, None, :]  # padded keys are never seen
    visible = visible[:, None, None]  # [B or 1, 1, 1, T, bk]
    mask = _key_block(padded.mask, 4, start, static.block_k)
    if mask is not None:
        visible = visible & mask
    return visible


def _block_logits(static: _Static, q, padded: _Padded, start) -> tuple[Array, Array]:
    """Scaled scores and final logits (soft cap, bias) of key block [start, start + block_k)."""
    k = _key_block(padded.key, 1, start, static.block_k)  # [B, bk, K, H]
    scores = static.scale * _matmul("btkgh,bskh->bkgts", q, k)
    logits = masking.soft_cap(scores, static.logits_soft_cap)  # [B, K, G, T, bk]
    bias = _key_block(padded.bias, 4, start, static.block_k)
    if bias is not None:
        logits = logits + bias
    return scores, logits


def _forward(static: _Static, query, key, value, bias, aux):
    batch, q_len, num_heads, head_dim = query.shape
    q, padded = _prepare(static, query, key, value, bias, aux)
    acc_dtype = jnp.promote_types(query.dtype, jnp.float32)
    stats_shape = q.shape[:1] + q.shape[2:4] + (q_len,)  # [B, K, G, T]

    def step(carry, block):
        start = block * static.block_k
        visible = _block_visible(static, q_len, padded, aux, start)

        def attend(carry):
            row_max, row_sum, acc = carry  # row_max is -inf until a row has seen a key
            _, logits = _block_logits(static, q, padded, start)
            logits = jnp.where(visible, logits, -jnp.inf)
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
            # Shift by a finite max so that exp never sees inf - inf; on rows that have seen
            # nothing yet everything is exp(-inf) = 0 whatever the shift.
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            probs = jnp.exp(logits - shift[..., None])  # [B, K, G, T, bk]
            rescale = jnp.exp(row_max - shift)
            v = _key_block(padded.value, 1, start, static.block_k)
            pv = _matmul("bkgts,bskh->bkgth", probs.astype(v.dtype), v)
            acc = acc * rescale[..., None] + pv
            row_sum = row_sum * rescale + jnp.sum(probs, axis=-1)
            return new_max, row_sum, acc

        # Blocks that a causal/window/length/segment mask hides from every query are skipped.
        return lax.cond(jnp.any(visible), attend, lambda carry: carry, carry), None

    init = (
        jnp.full(stats_shape, -jnp.inf, acc_dtype),
        jnp.zeros(stats_shape, acc_dtype),
        jnp.zeros(stats_shape + (head_dim,), acc_dtype),
    )
    (row_max, row_sum, acc), _ = lax.scan(step, init, jnp.arange(padded.num_blocks))
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]  # [B, K, G, T, H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    lse = masking.safe_lse(row_max, row_sum).transpose(0, 3, 1, 2).reshape(batch, q_len, -1)
    return out.astype(query.dtype), lse


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum x over the axes where `shape` broadcasts (size 1), keeping rank."""
    axes = tuple(
        i for i, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n != 1
    )
    return jnp.sum(x, axis=axes, keepdims=True)


def _backward(static: _Static, query, key, value, bias, aux, out, lse, d_out, d_lse):
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    q, padded = _prepare(static, query, key, value, bias, aux)
    dtype, acc_dtype = query.dtype, jnp.promote_types(query.dtype, jnp.float32)

    def grouped(x):  # [B, T, N, ...] -> [B, K, G, T, ...]
        x = x.reshape(batch, q_len, num_kv_heads, groups, *x.shape[3:])
        return jnp.moveaxis(x, 1, 3)

    do = grouped(d_out.astype(dtype))  # [B, K, G, T, H] input dtype
    # d lse / d logits = P, so an lse cotangent enters exactly like -delta (FA-2's D term).
    delta = jnp.sum(do.astype(acc_dtype) * grouped(out.astype(acc_dtype)), axis=-1)
    delta = delta - grouped(d_lse.astype(acc_dtype))  # [B, K, G, T]
    lse = grouped(lse)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see nothing: logits are -inf anyway
    bias_shape = None if padded.bias is None else padded.bias.shape
    bias_spans_keys = bias_shape is not None and bias_shape[4] != 1

    kv_block_shape = (batch, static.block_k, num_kv_heads, head_dim)
    bias_block_shape = None
    if bias_shape is not None:
        bias_block_shape = bias_shape[:4] + ((static.block_k,) if bias_spans_keys else (1,))

    def step(carry, block):
        start = block * static.block_k
        visible = _block_visible(static, q_len, padded, aux, start)

        def attend(carry):
            dq, dbias_acc = carry
            scores, logits = _block_logits(static, q, padded, start)
            probs = jnp.where(visible, jnp.exp(logits - lse[..., None]), 0.0)  # [B,K,G,T,bk]
            v = _key_block(padded.value, 1, start, static.block_k)
            d_v = _matmul("bkgts,bkgth->bskh", probs.astype(dtype), do)
            d_probs = _matmul("bkgth,bskh->bkgts", do, v)
            d_logits = probs * (d_probs - delta[..., None])
            d_scores = d_logits
            if static.logits_soft_cap is not None:
                tanh = jnp.tanh(scores / static.logits_soft_cap)
                d_scores = d_logits * (1.0 - jnp.square(tanh))
            d_scores = (d_scores * static.scale).astype(dtype)
            k = _key_block(padded.key, 1, start, static.block_k)
            dq = dq + _matmul("bkgts,bskh->btkgh", d_scores, k)
            d_k = _matmul("bkgts,btkgh->bskh", d_scores, q)
            d_bias_block = None
            if bias_block_shape is not None:
                d_bias_block = _sum_to_shape(d_logits, bias_block_shape)
                if not bias_spans_keys:
                    dbias_acc = dbias_acc + d_bias_block
                    d_bias_block = None
            return (dq, dbias_acc), (d_k, d_v, d_bias_block)

        def skip(carry):
            zeros = jnp.zeros(kv_block_shape, acc_dtype)
            d_bias_block = jnp.zeros(bias_block_shape, acc_dtype) if bias_spans_keys else None
            return carry, (zeros, zeros, d_bias_block)

        return lax.cond(jnp.any(visible), attend, skip, carry)

    dbias_init = None
    if bias_shape is not None and not bias_spans_keys:
        dbias_init = jnp.zeros(bias_shape, acc_dtype)
    (dq, dbias_acc), (d_k, d_v, d_bias_blocks) = lax.scan(
        step, (jnp.zeros(q.shape, acc_dtype), dbias_init), jnp.arange(padded.num_blocks)
    )

    def unblock(x):  # [num_blocks, B, bk, K, H] -> [B, S, K, H]
        x = jnp.moveaxis(x, 0, 1).reshape(batch, -1, *x.shape[3:])
        return x[:, : static.kv_len]

    d_query = dq.reshape(query.shape).astype(query.dtype)
    d_key = unblock(d_k).astype(key.dtype)
    d_value = unblock(d_v).astype(value.dtype)
    d_bias = None
    if bias is not None:
        if bias_spans_keys:  # [nb, B', K', G', T', bk] -> [B', K', G', T', S]
            d_bias = jnp.moveaxis(d_bias_blocks, 0, 4)
            d_bias = d_bias.reshape(*d_bias.shape[:4], -1)[..., : static.kv_len]
        else:
            d_bias = dbias_acc
        d_bias = d_bias.reshape(bias.shape).astype(bias.dtype)
    return d_query, d_key, d_value, d_bias, None
