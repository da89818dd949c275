"""Split-KV decode attention (flash-decoding) on Pallas' Triton backend.

One query token per sequence attends to its KV cache. Decode is memory-bound (about 2G/e FLOP
per byte of cache read, G = N/K query heads per kv head, e bytes per element), so the kernel is
built to read the cache once at full bandwidth:

- GQA packing: the G query heads of one kv head are one `[G, H]` tile (padded to >= 16 rows so
  the dots run on tensor cores), so each K/V tile is loaded once for all G heads;
- split-KV (Dao et al., "Flash-Decoding", 2023): the S axis is cut into `num_splits` chunks,
  one program per (batch, kv head, chunk), so short batches still fill every SM; each program
  writes its normalised partial output and log-sum-exp, and a small XLA epilogue merges the
  chunks exactly (lse = logsumexp_j lse_j, out = sum_j exp(lse_j - lse) out_j);
- per-sequence lengths: a program never reads past `lengths[b]` (blocks beyond it are skipped,
  the last block is masked); a sequence or chunk with no keys gives out 0 and lse -inf, never NaN;
- an optional paged cache: pools `[P, page_size, K, H]` and a page table `[B, pages]`, one page
  per inner step.

Limits: float16, bfloat16, float32 (float64 is declined: the 'xla' path serves it); H <= 256
(padded to a power of two, which copies the cache when H is not one); page sizes are powers of
two (>= 16 on a GPU); caches under 2**31 elements (Triton's int32 offsets). Index arithmetic is
int32 throughout, so the kernel also traces with `jax_enable_x64`.
Runs compiled on CUDA GPUs and in Pallas interpret mode elsewhere (`common.interpret_mode()`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

# `dot` lives in pallas.triton since JAX 0.10 (pallas.dot is a deprecated alias there).
_dot = getattr(pltriton, "dot", None) or pl.dot

# Tensor-core dots (mma) need at least 16 rows: the packed query tile is padded to this.
MIN_DOT_ROWS = 16
# Triton computes element offsets in int32.
MAX_CACHE_ELEMENTS = 2**31 - 1
# SM count assumed when the device does not report one (H100 SXM).
DEFAULT_SM_COUNT = 132
MAX_HEAD_DIM = 256
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Tiling of the decode kernel.

    block_k: keys per inner step (contiguous cache; a paged cache steps one page at a time).
    num_splits: chunks of S per sequence; None picks enough to fill the GPU (see `num_splits`).
    programs_per_sm: what the split heuristic aims for: several programs per SM hide load
      latency, and many programs make the last, partly filled wave a small part of the time.
    min_split: the fewest keys a chunk gets from the heuristic (each chunk costs one partial
      write and read of [G, H] float32 in the merge).
    unmasked_body: load full blocks without masks and mask only a chunk's last, partial block
      (False: every load is masked by the length).
    """

    # Defaults: the best of 12 tilings on an H100 (benchmarks/results/decode_h100.json, "tuning").
    block_k: int = 64
    num_splits: int | None = None
    programs_per_sm: int = 16
    min_split: int = 512
    unmasked_body: bool = True
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        common.check_config_fields(
            self,
            ints=("num_splits", "programs_per_sm", "min_split", "num_warps", "num_stages"),
            powers_of_two=("block_k",),
            bools=("unmasked_body",),
            optional=("num_splits",),
        )
        if self.block_k < MIN_DOT_ROWS:
            raise ValueError(f"DecodeConfig.block_k must be >= {MIN_DOT_ROWS}, got {self.block_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(
                f"DecodeConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}"
            )


def sm_count() -> int:
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or DEFAULT_SM_COUNT)


def num_splits(batch: int, kv_heads: int, capacity: int, step: int, config: DecodeConfig) -> int:
    """Chunks of S per (sequence, kv head): enough programs for every SM, chunks >= min_split."""
    if config.num_splits is not None:
        return max(1, min(config.num_splits, pl.cdiv(capacity, step)))
    target = config.programs_per_sm * sm_count()
    wanted = pl.cdiv(target, batch * kv_heads)
    most = max(1, capacity // max(config.min_split, step))
    return max(1, min(wanted, most))


def _decode_kernel(
    lengths_ref,  # [B] int32 (whole array)
    page_table_ref,  # [pages] int32 (this sequence's row), or None for a contiguous cache
    q_ref,  # [rows, Hp]: the G query heads of this kv head, zero-padded
    k_ref,  # [S, Hp] contiguous, or [P, page_size, Hp] paged
    v_ref,  # same as k_ref
    o_ref,  # [G, Hp] float32: this chunk's normalised output (only the G real rows)
    lse_ref,  # [G] float32: this chunk's log-sum-exp (-inf when it has no keys)
    *,
    scale: float,
    logits_soft_cap: float | None,
    block_k: int,
    split_len: int,
    paged: bool,
    precision: lax.Precision | None,
    unmasked_body: bool,
):
    b, split = pl.program_id(0), pl.program_id(2)
    rows = q_ref.shape[0]
    length = lengths_ref[b]
    start = split * split_len
    end = jnp.minimum(start + split_len, length)
    num_blocks = jnp.maximum(end - start + block_k - 1, 0) // block_k
    q = q_ref[...]  # [rows, Hp]

    def body(i, carry, masked=True):
        o, m, denom = carry  # [rows, Hp], [rows], [rows]
        first = start + i * block_k
        valid = first + jnp.arange(block_k, dtype=jnp.int32) < end  # [block_k]
        mask = valid[:, None] if masked else None
        if paged:
            page = page_table_ref[first // block_k]
            k_tile, v_tile = k_ref.at[page], v_ref.at[page]  # [page_size, Hp]
        else:
            k_tile = k_ref.at[pl.ds(first, block_k), :]  # [block_k, Hp]
            v_tile = v_ref.at[pl.ds(first, block_k), :]
        k = pltriton.load(k_tile, mask=mask, other=0.0 if masked else None)
        s = _dot(q, k, trans_b=True, precision=precision) * scale  # [rows, block_k] f32
        if logits_soft_cap is not None:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        if masked:
            s = jnp.where(valid[None, :], s, -jnp.inf)
        # Every visited block holds a key (first < end), so m_new is finite and no NaN appears.
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        denom = alpha * denom + p.sum(axis=-1)
        v = pltriton.load(v_tile, mask=mask, other=0.0 if masked else None)
        o = alpha[:, None] * o + _dot(p.astype(v.dtype), v, precision=precision)
        return o, m_new, denom

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    if unmasked_body:  # full blocks without masks, then the partial last block (if any)
        num_full = jnp.maximum(end - start, 0) // block_k
        carry = lax.fori_loop(0, num_full, functools.partial(body, masked=False), init)
        o, m, denom = lax.fori_loop(num_full, num_blocks, body, carry)
    else:
        o, m, denom = lax.fori_loop(0, num_blocks, body, init)
    has_keys = denom > 0
    safe_l = jnp.where(has_keys, denom, 1.0)
    o = jnp.where(has_keys[:, None], o / safe_l[:, None], 0.0)
    lse = jnp.where(has_keys, m + jnp.log(safe_l), -jnp.inf)
    groups = o_ref.shape[0]
    if groups == rows:
        o_ref[...] = o
        lse_ref[...] = lse
    else:  # write the G real rows only: the padding rows would cost partial-result traffic
        real = jnp.arange(rows, dtype=jnp.int32) < groups
        pltriton.store(o_ref.at[pl.ds(0, rows), :], o, mask=real[:, None])
        pltriton.store(lse_ref.at[pl.ds(0, rows)], lse, mask=real)


def merge_partials(
    out: jax.Array,  # [..., splits, rows, H] float32, normalised per split
    lse: jax.Array,  # [..., splits, rows] float32, -inf for an empty split
    axis: int = -3,
) -> tuple[jax.Array, jax.Array]:
    """Exact log-sum-exp merge of partial attention results; empty parts contribute nothing."""
    lse_axis = axis + 1 if axis < 0 else axis
    m = lse.max(axis=lse_axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # 0 for empty parts
    total = w.sum(axis=lse_axis)
    merged = (jnp.expand_dims(w, -1) * out).sum(axis=axis)
    has_keys = total > 0
    safe = jnp.where(has_keys, total, 1.0)
    merged = merged / safe[..., None]
    merged_lse = jnp.where(has_keys, jnp.squeeze(m, lse_axis) + jnp.log(safe), -jnp.inf)
    return merged, merged_lse


def decode_attention(
    query: jax.Array,  # [B, N, H]
    k_cache: jax.Array,  # [B, S, K, H], or [P, page_size, K, H] with page_table
    v_cache: jax.Array,  # same shape as k_cache
    lengths: jax.Array,  # [B] int32
    *,
    page_table: jax.Array | None = None,  # [B, pages] int32
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    config: DecodeConfig | None = None,
) -> tuple[jax.Array, jax.Array]:  # [B, N, H] in query.dtype, lse [B, N] float32
    """Split-KV decode attention. Arguments are assumed checked (see `jattn.decode_attention`)."""
    config = config or DecodeConfig()
    batch, num_heads, head_dim = query.shape
    paged = page_table is not None
    if paged:
        _, page_size, num_kv_heads, _ = k_cache.shape
        capacity = page_table.shape[1] * page_size
        block_k = page_size
    else:
        _, capacity, num_kv_heads, _ = k_cache.shape
        block_k = min(config.block_k, max(MIN_DOT_ROWS, 1 << (capacity - 1).bit_length()))
    groups = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    padded = common.padded_head_dim(head_dim)
    rows = max(MIN_DOT_ROWS, 1 << (groups - 1).bit_length())

    splits = num_splits(batch, num_kv_heads, capacity, block_k, config)
    split_len = pl.cdiv(pl.cdiv(capacity, splits), block_k) * block_k
    splits = pl.cdiv(capacity, split_len)

    q = query.reshape(batch, num_kv_heads, groups, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - groups), (0, padded - head_dim)))
    k_cache = common.pad_last(k_cache, padded)  # a copy only when H is not a power of two
    v_cache = common.pad_last(v_cache, padded)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, capacity)  # never read past the cache

    if paged:
        pool = k_cache.shape[0]
        cache_spec = pl.BlockSpec((pool, page_size, None, padded), lambda b, h, j: (0, 0, h, 0))
        table_spec = pl.BlockSpec((None, page_table.shape[1]), lambda b, h, j: (b, 0))
        table = [page_table.astype(jnp.int32)]
    else:
        cache_spec = pl.BlockSpec((None, capacity, None, padded), lambda b, h, j: (b, 0, h, 0))
        table_spec, table = None, []
    precision = lax.Precision.HIGHEST if query.dtype == jnp.float32 else None
    kernel = functools.partial(
        _decode_kernel if paged else _no_table(_decode_kernel),
        scale=float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        block_k=block_k,
        split_len=split_len,
        paged=paged,
        precision=precision,
        unmasked_body=config.unmasked_body,
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[
            pl.BlockSpec((batch,), lambda b, h, j: (0,)),
            *([table_spec] if paged else []),
            pl.BlockSpec((None, None, rows, padded), lambda b, h, j: (b, h, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, groups, padded), lambda b, h, j: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, groups), lambda b, h, j: (b, h, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, groups, padded), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, splits, groups), jnp.float32),
        ],
        compiler_params=common.triton_params(config.num_warps, config.num_stages),
        interpret=common.interpret_mode(),
        name="jattn_decode",
    )(lengths, *table, q, k_cache, v_cache)

    out, lse = merge_partials(out[..., :head_dim], lse)
    out = out.reshape(batch, num_heads, head_dim).astype(query.dtype)
    return out, lse.reshape(batch, num_heads)


def _no_table(kernel):
    """The kernel without the page-table operand (contiguous cache)."""

    def contiguous(lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, **kwargs):
        return kernel(lengths_ref, None, q_ref, k_ref, v_ref, o_ref, lse_ref, **kwargs)

    return contiguous


def check_supported(
    k_cache_shape: tuple[int, ...], head_dim: int, page_size: int | None, dtype=None
) -> None:
    """Raise NotImplementedError (naming the reason) for calls this kernel cannot serve."""
    if dtype is not None and jnp.dtype(dtype) not in DTYPES:
        raise NotImplementedError(
            f"the triton decode kernel serves float16/bfloat16/float32, not {jnp.dtype(dtype)} "
            "(its float32 accumulators; the 'xla' implementation serves float64)"
        )
    if head_dim > MAX_HEAD_DIM:
        raise NotImplementedError(f"the triton decode kernel supports H <= {MAX_HEAD_DIM}")
    elements = math.prod(k_cache_shape[:-1]) * common.padded_head_dim(head_dim)
    if elements > MAX_CACHE_ELEMENTS:
        raise NotImplementedError(
            f"the triton decode kernel needs caches under 2**31 elements (int32 offsets); "
            f"got {k_cache_shape}"
        )
    if page_size is not None:
        if page_size & (page_size - 1):
            raise NotImplementedError(f"page_size must be a power of two, got {page_size}")
        if common.on_gpu() and page_size < MIN_DOT_ROWS:
            raise NotImplementedError(f"page_size must be >= {MIN_DOT_ROWS} on a GPU")
