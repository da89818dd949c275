"""`implementation="xla_chunked"`: tiled online-softmax attention in plain XLA.

Forward: for each block of queries, a `lax.scan` over key blocks carries the running row max, row
sum and output (the FlashAttention recurrence). Backward: the same tiles again, recomputing the
probabilities from the saved log-sum-exp (FlashAttention-2 §3.1.1); dq is carried per query
block, dk, dv (and dbias) are accumulated tile by tile. Memory is O(block_q * block_k) per step
plus the O(T + S) inputs and outputs: the `[T, S]` matrix is never stored in either direction.
Tiles that a causal, window, length, segment or boolean mask hides entirely are skipped, not
computed and masked. Serves every feature of the contract; runs anywhere XLA does.

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
from pallas_kernels import common

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChunkedConfig:
    """Tiling of the chunked implementation.

    block_q, block_k: queries and keys per tile. T and S are padded up to multiples (padding is
    masked out); a block larger than the sequence shrinks to it.
    """

    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        common.check_config_fields(self, ints=("block_q", "block_k"))


# Measured defaults (benchmarks/chunked_blocks.py; results/chunked_blocks_*.json): on an H100
# (bf16, T=4096, H=128) (2048, 1024) is within 6% of the best tiling causal and non-causal; on a
# 2-core CPU (f32, T=2048, H=64) (256, 512) is best for both.
_DEFAULT_BLOCKS = {"gpu": (2048, 1024), "cpu": (256, 512)}


def default_config(platform: str | None = None) -> ChunkedConfig:
    """The tiling `config=None` uses on this platform (jax.default_backend() by default)."""
    block_q, block_k = _DEFAULT_BLOCKS.get(platform or jax.default_backend(), (512, 512))
    return ChunkedConfig(block_q=block_q, block_k=block_k)


class _Static(NamedTuple):
    """Everything about a call that is not an array: it keys the custom_vjp closure."""

    scale: float
    is_causal: bool
    local_window_size: tuple[int, int] | None
    logits_soft_cap: float | None
    block_q: int
    block_k: int
    q_len: int  # T before padding
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
    autodiff: bool = False,
) -> tuple[Array, Array]:  # [B, T, N, H] in query.dtype, lse [B, T, N] float32
    """Attention with validated, rank-4 inputs (see `jattn.dot_product_attention`).

    `autodiff=True` leaves out the custom_vjp, so JAX differentiates the forward's scans
    themselves: forward mode (jax.jvp, jacfwd, hessian) and any order, in O(T) memory under
    jvp (reverse mode stores per-tile residuals: O(T * S)).
    """
    static, aux = _static_and_aux(
        query, key, mask, scale, is_causal, q_offset, query_seq_lengths, key_value_seq_lengths,
        local_window_size, segment_ids, logits_soft_cap, config,
    )  # fmt: skip
    if autodiff:
        return _forward(static, query, key, value, bias, aux)
    return _attention_vjp(static)(query, key, value, bias, aux)


def chunked_attention_backward(
    query: Array,  # [B, T, N, H]
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    out: Array,  # [B, T, N, H]
    lse: Array,  # [B, T, N] float32
    d_out: Array,  # [B, T, N, H]
    d_lse: Array,  # [B, T, N]
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
) -> tuple[Array, Array, Array]:  # dq, dk, dv
    """`chunked_attention`'s backward (no bias, no mask) at residuals (out, lse) computed
    elsewhere (`jattn.attention.attention_backward`)."""
    static, aux = _static_and_aux(
        query, key, None, scale, is_causal, q_offset, query_seq_lengths, key_value_seq_lengths,
        local_window_size, segment_ids, logits_soft_cap, config,
    )  # fmt: skip
    dq, dk, dv = _backward(static, query, key, value, None, aux, out, lse, d_out, d_lse)[:3]
    return dq, dk, dv


def _static_and_aux(
    query, key, mask, scale, is_causal, q_offset, query_seq_lengths, key_value_seq_lengths,
    local_window_size, segment_ids, logits_soft_cap, config,
) -> tuple[_Static, _Aux]:  # fmt: skip
    q_len, kv_len = query.shape[1], key.shape[1]
    static = _Static(
        scale=float(scale),
        is_causal=is_causal,
        local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
        block_q=min(config.block_q, q_len),
        block_k=min(config.block_k, kv_len),
        q_len=q_len,
        kv_len=kv_len,
    )
    q_ids, kv_ids = (None, None) if segment_ids is None else segment_ids
    aux = _Aux(mask, q_offset, query_seq_lengths, key_value_seq_lengths, q_ids, kv_ids)
    return static, aux


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


# --- tiles ----------------------------------------------------------------------------------


def _matmul(spec: str, a: Array, b: Array) -> Array:
    """einsum in the operands' dtype, accumulated in (at least) float32."""
    acc = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return jnp.einsum(spec, a, b, precision=_HIGHEST, preferred_element_type=acc)


def _pad_axis(x: Array | None, axis: int, padded_len: int) -> Array | None:
    """Zero-pad one axis of x up to padded_len (a broadcast axis of size 1 stays as it is)."""
    if x is None or x.shape[axis] in (1, padded_len):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded_len - x.shape[axis])
    return jnp.pad(x, widths)


def _tile(x: Array | None, starts: dict[int, Array], sizes: dict[int, int]) -> Array | None:
    """The block of x at `starts` along the given axes (broadcast axes of size 1 as they are)."""
    if x is None:
        return None
    for axis, start in starts.items():
        if x.shape[axis] != 1:
            x = lax.dynamic_slice_in_dim(x, start, sizes[axis], axis)
    return x


def _add_tile(acc: Array, update: Array, starts: dict[int, Array]) -> Array:
    """acc with `update` added at `starts` (update has acc's shape on every other axis)."""
    indices = [jnp.zeros((), jnp.int32)] * acc.ndim
    for axis, start in starts.items():
        if acc.shape[axis] != 1:
            indices[axis] = jnp.asarray(start, jnp.int32)
    current = lax.dynamic_slice(acc, indices, update.shape)
    return lax.dynamic_update_slice(acc, current + update, indices)


class _Padded(NamedTuple):
    query: Array  # [B, T_pad, K, G, H] input dtype
    key: Array  # [B, S_pad, K, H]
    value: Array  # [B, S_pad, K, H]
    bias: Array | None  # [B', K', G', T' or T_pad, S' or S_pad] float32
    mask: Array | None  # [B', K', G', T' or T_pad, S' or S_pad] bool
    q_segment_ids: Array | None  # [B, T_pad]
    kv_segment_ids: Array | None  # [B, S_pad]
    num_q_blocks: int
    num_k_blocks: int


def _prepare(static: _Static, query, key, value, bias, aux) -> _Padded:
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    num_q_blocks = -(-q_len // static.block_q)
    num_k_blocks = -(-static.kv_len // static.block_k)
    t_pad, s_pad = num_q_blocks * static.block_q, num_k_blocks * static.block_k
    q = query.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)

    def pad_tq_ts(x):  # [B', K', G', T', S']
        return _pad_axis(_pad_axis(x, 3, t_pad), 4, s_pad)

    acc_dtype = jnp.promote_types(query.dtype, jnp.float32)
    grouped_bias = (
        None if bias is None else masking.group_heads(bias.astype(acc_dtype), num_kv_heads)
    )
    return _Padded(
        query=_pad_axis(q, 1, t_pad),
        key=_pad_axis(key, 1, s_pad),
        value=_pad_axis(value, 1, s_pad),
        bias=pad_tq_ts(grouped_bias),
        mask=pad_tq_ts(masking.group_heads(aux.mask, num_kv_heads)),
        q_segment_ids=_pad_axis(aux.q_segment_ids, 1, t_pad),
        kv_segment_ids=_pad_axis(aux.kv_segment_ids, 1, s_pad),
        num_q_blocks=num_q_blocks,
        num_k_blocks=num_k_blocks,
    )


def _tile_visible(static: _Static, padded: _Padded, aux: _Aux, q_start, k_start) -> Array:
    """Which queries of the tile see which keys: [B', K', G', block_q, block_k] bool."""
    q_pos = q_start + jnp.arange(static.block_q)
    k_pos = k_start + jnp.arange(static.block_k)
    visible = masking.visible_keys(
        q_pos,
        k_pos,
        is_causal=static.is_causal,
        q_offset=aux.q_offset,
        local_window_size=static.local_window_size,
        query_seq_lengths=aux.query_seq_lengths,
        key_value_seq_lengths=aux.key_value_seq_lengths,
        q_segment_ids=_tile(padded.q_segment_ids, {1: q_start}, {1: static.block_q}),
        kv_segment_ids=_tile(padded.kv_segment_ids, {1: k_start}, {1: static.block_k}),
    )
    # Padding rows and columns are never seen.
    visible = visible & (q_pos < static.q_len)[None, :, None] & (k_pos < static.kv_len)[None, None]
    visible = visible[:, None, None]  # [B or 1, 1, 1, bq, bk]
    sizes = {3: static.block_q, 4: static.block_k}
    mask = _tile(padded.mask, {3: q_start, 4: k_start}, sizes)
    return visible if mask is None else visible & mask


class _KeyTile(NamedTuple):
    key: Array  # [B, bk, K, H], NaN/inf keys zeroed
    value: Array  # [B, bk, K, H], the same keys zeroed
    bad: Array  # [B, K, 1, 1, bk] bool: the key or value held NaN/inf


def _key_tile(static: _Static, padded: _Padded, k_start) -> _KeyTile:
    """One key block, with non-finite keys zeroed (see `masking.split_nonfinite_keys`)."""
    k = _tile(padded.key, {1: k_start}, {1: static.block_k})
    v = _tile(padded.value, {1: k_start}, {1: static.block_k})
    k, v, bad = masking.split_nonfinite_keys(k, v)  # bad: [B, bk, K]
    return _KeyTile(k, v, jnp.moveaxis(bad, 1, 2)[:, :, None, None])


def _tile_logits(
    static: _Static, q, keys: _KeyTile, visible, padded: _Padded, q_start, k_start
) -> tuple[Array, Array]:
    """Scaled scores and final logits (soft cap, bias; NaN on rows that see a non-finite key)
    of one tile: [B, K, G, bq, bk] each."""
    scores = static.scale * _matmul("btkgh,bskh->bkgts", q, keys.key)
    logits = masking.soft_cap(scores, static.logits_soft_cap)
    sizes = {3: static.block_q, 4: static.block_k}
    bias = _tile(padded.bias, {3: q_start, 4: k_start}, sizes)
    logits = logits if bias is None else logits + bias
    return scores, masking.poison_rows(logits, jnp.any(visible & keys.bad, axis=-1))


# --- forward ----------------------------------------------------------------------------------


def _forward(static: _Static, query, key, value, bias, aux):
    batch, q_len, num_heads, head_dim = query.shape
    padded = _prepare(static, query, key, value, bias, aux)
    acc_dtype = jnp.promote_types(query.dtype, jnp.float32)

    def query_block(q_block):
        q_start = q_block * static.block_q
        q = _tile(padded.query, {1: q_start}, {1: static.block_q})  # [B, bq, K, G, H]
        stats_shape = (batch, *q.shape[2:4], static.block_q)  # [B, K, G, bq]

        def key_block(carry, k_block):
            k_start = k_block * static.block_k
            visible = _tile_visible(static, padded, aux, q_start, k_start)

            def attend(carry):
                row_max, row_sum, acc = carry  # row_max is -inf until a row has seen a key
                keys = _key_tile(static, padded, k_start)
                _, logits = _tile_logits(static, q, keys, visible, padded, q_start, k_start)
                logits = jnp.where(visible, logits, -jnp.inf)
                # The shift cancels in every result: no derivative through it (JAX's max jvp
                # divides by the count of maxima, 0 when XLA recomputes the logits inexactly).
                new_max = lax.stop_gradient(jnp.maximum(row_max, jnp.max(logits, axis=-1)))
                # Shift by a finite max so that exp never sees inf - inf; on rows that have
                # seen nothing yet everything is exp(-inf) = 0 whatever the shift.
                shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
                probs = jnp.exp(logits - shift[..., None])  # [B, K, G, bq, bk]
                rescale = jnp.exp(row_max - shift)
                v = keys.value
                pv = _matmul("bkgts,bskh->bkgth", probs.astype(v.dtype), v)
                acc = acc * rescale[..., None] + pv
                row_sum = row_sum * rescale + jnp.sum(probs, axis=-1)
                return new_max, row_sum, acc

            return lax.cond(jnp.any(visible), attend, lambda carry: carry, carry), None

        init = (
            jnp.full(stats_shape, -jnp.inf, acc_dtype),
            jnp.zeros(stats_shape, acc_dtype),
            jnp.zeros((*stats_shape, head_dim), acc_dtype),
        )
        (row_max, row_sum, acc), _ = lax.scan(key_block, init, jnp.arange(padded.num_k_blocks))
        out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]  # [B, K, G, bq, H]
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        return out, masking.safe_lse(row_max, row_sum)

    out, lse = lax.map(query_block, jnp.arange(padded.num_q_blocks))  # [nq, B, K, G, bq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, num_heads, -1, head_dim)[:, :, :q_len]
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, num_heads, -1)[:, :, :q_len]
    return out.transpose(0, 2, 1, 3).astype(query.dtype), lse.transpose(0, 2, 1)


# --- backward ---------------------------------------------------------------------------------


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
    padded = _prepare(static, query, key, value, bias, aux)
    dtype, acc_dtype = query.dtype, jnp.promote_types(query.dtype, jnp.float32)
    t_pad = padded.num_q_blocks * static.block_q

    def grouped(x):  # [B, T, N, ...] -> [B, K, G, T_pad, ...]
        x = _pad_axis(x, 1, t_pad).reshape(batch, t_pad, num_kv_heads, groups, *x.shape[3:])
        return jnp.moveaxis(x, 1, 3)

    do = grouped(d_out.astype(dtype))  # [B, K, G, T_pad, H] input dtype
    # d lse / d logits = P, so an lse cotangent enters exactly like -delta (FA-2's D term).
    delta = jnp.sum(do.astype(acc_dtype) * grouped(out.astype(acc_dtype)), axis=-1)
    delta = delta - grouped(d_lse.astype(acc_dtype))  # [B, K, G, T_pad]
    lse = grouped(lse)
    # Rows that see nothing: their logits are -inf anyway. A NaN lse (a row that sees a
    # non-finite key) stays NaN, so that row's gradients are NaN too.
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    bias_tile_shape = None
    if padded.bias is not None:
        b, k, g, t, s = padded.bias.shape
        bias_tile_shape = (b, k, g, static.block_q if t > 1 else 1, static.block_k if s > 1 else 1)

    def query_block(carry, q_block):
        q_start = q_block * static.block_q
        q = _tile(padded.query, {1: q_start}, {1: static.block_q})  # [B, bq, K, G, H]
        rows = {3: q_start}, {3: static.block_q}
        do_q, delta_q, lse_q = (_tile(x, *rows) for x in (do, delta, lse))

        def key_block(carry, k_block):
            k_start = k_block * static.block_k
            visible = _tile_visible(static, padded, aux, q_start, k_start)

            def attend(carry):
                dq, dk, dv, dbias = carry
                keys = _key_tile(static, padded, k_start)
                scores, logits = _tile_logits(static, q, keys, visible, padded, q_start, k_start)
                probs = jnp.where(visible, jnp.exp(logits - lse_q[..., None]), 0.0)
                v = keys.value
                dv = _add_tile(
                    dv, _matmul("bkgts,bkgth->bskh", probs.astype(dtype), do_q), {1: k_start}
                )
                d_probs = _matmul("bkgth,bskh->bkgts", do_q, v)
                # where, not probs * ...: a NaN delta (a poisoned row) must not reach hidden keys
                d_logits = jnp.where(visible, probs * (d_probs - delta_q[..., None]), 0.0)
                d_scores = d_logits
                if static.logits_soft_cap is not None:
                    tanh = jnp.tanh(scores / static.logits_soft_cap)
                    d_scores = d_logits * (1.0 - jnp.square(tanh))
                d_scores = (d_scores * static.scale).astype(dtype)
                k = keys.key
                dq = dq + _matmul("bkgts,bskh->btkgh", d_scores, k)
                dk = _add_tile(dk, _matmul("bkgts,btkgh->bskh", d_scores, q), {1: k_start})
                if dbias is not None:
                    d_bias_tile = _sum_to_shape(d_logits, bias_tile_shape)
                    dbias = _add_tile(dbias, d_bias_tile, {3: q_start, 4: k_start})
                return dq, dk, dv, dbias

            return lax.cond(jnp.any(visible), attend, lambda carry: carry, carry), None

        dk, dv, dbias = carry
        init = (jnp.zeros(q.shape, acc_dtype), dk, dv, dbias)
        (dq, dk, dv, dbias), _ = lax.scan(key_block, init, jnp.arange(padded.num_k_blocks))
        return (dk, dv, dbias), dq

    kv_acc = jnp.zeros(padded.key.shape, acc_dtype)  # [B, S_pad, K, H]
    dbias_acc = None if padded.bias is None else jnp.zeros(padded.bias.shape, acc_dtype)
    (dk, dv, dbias), dq = lax.scan(
        query_block, (kv_acc, kv_acc, dbias_acc), jnp.arange(padded.num_q_blocks)
    )  # dq: [nq, B, bq, K, G, H]
    d_query = jnp.moveaxis(dq, 0, 1).reshape(batch, t_pad, num_heads, head_dim)[:, :q_len]
    d_bias = None
    if bias is not None:  # [B', K', G', T' or T_pad, S' or S_pad] -> bias.shape
        d_bias = dbias[:, :, :, : bias.shape[2], : bias.shape[3]].reshape(bias.shape)
        d_bias = d_bias.astype(bias.dtype)
    return (
        d_query.astype(query.dtype),
        dk[:, : static.kv_len].astype(key.dtype),
        dv[:, : static.kv_len].astype(value.dtype),
        d_bias,
        None,
    )
