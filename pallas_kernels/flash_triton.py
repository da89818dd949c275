"""Flash attention, forward and backward, on Pallas' Triton backend (any CUDA GPU; CPU interpret).

FlashAttention-2 (Dao, 2023): the forward runs an online softmax over key tiles for each query
tile and writes the output and the log-sum-exp; the backward recomputes each tile's
probabilities from the lse, with one kernel for dq (a program per query tile) and one for dk, dv
(a program per key tile), so every output has a single writer: no atomics, the same bits on
every run. delta = rowsum(dO * O) is computed first (fused by XLA).

Every option of `jattn.dot_product_attention` is applied inside the kernels, tile by tile:
causal with q_offset (per batch), sliding window, query and key lengths, segment ids, soft cap
(and its gradient), additive bias (dbias from a separate kernel, launched only when the bias is
differentiated), a boolean mask, GQA (query head n reads kv head n // G; dk, dv are
written per query head in float32 and summed over G, never repeating K/V in memory). Key tiles
that causal, window or length masks hide entirely are not visited.

Limits: T and S are padded up to the block sizes and H up to a power of two >= 16 (copies made
only when needed); a bias or mask that broadcasts over T or S is materialised at [T, S]; float64
is not served.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MIN_BLOCK = 16  # Triton's tensor-core dots need every extent >= 16
_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TritonConfig:
    """Tiling and launch parameters of the Triton flash kernels.

    block_q, block_k: forward tile (queries per program, keys per loop step).
    bwd_block_q, bwd_block_k: backward tile (dq: a program per bwd_block_q queries; dk/dv: a
    program per bwd_block_k keys). All powers of two >= 16; they shrink to short sequences.
    num_warps, num_stages (and bwd_*): Triton's launch parameters.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    bwd_block_q: int = 64
    bwd_block_k: int = 64
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2

    def __post_init__(self):
        common.check_config_fields(
            self, ints=tuple(field.name for field in dataclasses.fields(self))
        )
        for name in ("block_q", "block_k", "bwd_block_q", "bwd_block_k"):
            value = getattr(self, name)
            if value < _MIN_BLOCK or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}, got {value}")
        for name in ("num_warps", "bwd_num_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name} must be 1, 2, 4, 8 or 16, got {getattr(self, name)}")
        for name in ("num_stages", "bwd_num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def default_config(head_dim: int, dtype) -> TritonConfig:
    """The tiling per head dim and dtype, from a sweep on an H100 (bf16, T=4096, 16k tokens;
    benchmarks/triton_configs.py, results/triton_configs_h100_bf16_T4096.json). float32 tiles
    take twice the registers and shared memory (its dots run without tensor cores): smaller."""
    padded = common.padded_head_dim(head_dim)
    if jnp.dtype(dtype).itemsize >= 4:
        if padded <= 128:
            return TritonConfig(
                block_q=64, block_k=32, num_stages=2, bwd_block_q=32, bwd_block_k=32
            )
        return TritonConfig(
            block_q=32, block_k=32, num_stages=1, bwd_block_q=32, bwd_block_k=32, bwd_num_stages=1
        )
    if padded <= 64:
        return TritonConfig(block_q=64, block_k=64, num_warps=4, num_stages=3, bwd_num_stages=3)
    if padded <= 128:
        return TritonConfig(block_q=128, block_k=128, num_warps=8, num_stages=3)
    return TritonConfig(block_q=64, block_k=64, num_warps=4, num_stages=3, bwd_num_warps=8)


def _shared_memory_estimate(block_q, block_k, stages, head_dim, itemsize, pair_itemsize):
    """Bytes a kernel's pipeline holds: a resident tile of block_q rows plus, per stage, two
    streamed tiles of block_k rows and one [block_q, block_k] bias/mask tile. (The dk/dv kernel
    holds block_k rows and streams block_q rows: the same sum with the roles swapped.)"""
    resident = block_q * head_dim * itemsize
    streamed = 2 * block_k * head_dim * itemsize + block_q * block_k * pair_itemsize
    return resident + stages * streamed


def _fit_shared_memory(
    config: TritonConfig, *, head_dim: int, itemsize: int, pair_itemsize: int
) -> TritonConfig:
    """Shrink a default config until its pipelines fit this GPU's shared memory: the forward
    sheds stages first (down to 2), then narrows its streamed tiles, then takes a single stage;
    the backward sheds stages down to 1 before narrowing. A bias or mask adds a tile per stage,
    which the tuned defaults (measured without) do not budget for."""
    budget = common.shared_memory_bytes()
    if budget is None:
        return config

    def fit(block_q, block_k, stages, spare=0):
        """spare: streamed tiles beyond the pipeline's. The backward kernels hold one more: on
        the H200 (JAX 0.11.2) the causal dk/dv kernel at H=256 with 64 x 64 tiles and 2 stages
        asked for 265 KiB where the pipeline counts 192; there a single stage (176-186 TFLOP/s
        forward+backward) beats halving the tiles (90-103), so the backward sheds stages first."""
        while (
            _shared_memory_estimate(
                block_q, block_k, stages + spare, head_dim, itemsize, pair_itemsize
            )
            > budget
        ):
            if stages > (1 if spare else 2):
                stages -= 1
            elif block_k > _MIN_BLOCK * 2:
                block_k //= 2
            elif stages > 1:
                stages -= 1
            else:
                break
        return block_k, stages

    block_k, stages = fit(config.block_q, config.block_k, config.num_stages)
    # dq kernel: q, dO resident, k, v streamed; dk/dv kernel: k, v resident, q, dO streamed.
    bwd_block_k, bwd_stages = fit(
        config.bwd_block_q * 2, config.bwd_block_k, config.bwd_num_stages, spare=1
    )
    bwd_block_q, bwd_stages = fit(config.bwd_block_k * 2, config.bwd_block_q, bwd_stages, spare=1)
    return dataclasses.replace(
        config,
        block_k=block_k,
        num_stages=stages,
        bwd_block_q=bwd_block_q,
        bwd_block_k=bwd_block_k,
        bwd_num_stages=bwd_stages,
    )


def _fit_stages_to_tiles(
    config: TritonConfig, *, head_dim: int, itemsize: int, pair_itemsize: int
) -> TritonConfig:
    """Stages of a config whose tiles are fixed (a flex block mask's blocks are the tiles): each
    pipeline sheds stages, down to 1, until it fits this GPU's shared memory (the budget and the
    backward's spare tile as in `_fit_shared_memory`). ValueError when one stage does not fit.

    Before: the block mask's 128 x 128 blocks at H=128 kept the backward's 2 stages and failed
    on the H200 ("requested 295936, available: 232448")."""
    budget = common.shared_memory_bytes()
    if budget is None:
        return config

    def fit(resident, streamed, stages, spare, kernel):
        def estimate(n):
            return _shared_memory_estimate(
                resident, streamed, n + spare, head_dim, itemsize, pair_itemsize
            )

        while stages > 1 and estimate(stages) > budget:
            stages -= 1
        if estimate(stages) > budget:
            raise ValueError(
                f"flex_attention: the block mask's {config.block_q} x {config.block_k} blocks are "
                f"the Triton kernels' tiles, and the {kernel} needs ~{estimate(stages)} bytes of "
                f"shared memory at head dim {head_dim} (this GPU has {budget}): build the block "
                "mask with smaller blocks (create_block_mask(..., block_q=64, block_kv=64))"
            )
        return stages

    stages = fit(config.block_q, config.block_k, config.num_stages, 0, "forward")
    bwd = fit(config.bwd_block_q * 2, config.bwd_block_k, config.bwd_num_stages, 1, "dq kernel")
    bwd = fit(config.bwd_block_k * 2, config.bwd_block_q, bwd, 1, "dk/dv kernel")
    return dataclasses.replace(config, num_stages=stages, bwd_num_stages=bwd)


@dataclasses.dataclass(frozen=True)
class FlexSpec:
    """A user score_mod / mask_mod traced into the kernels (`jattn.flex_attention`).

    `score_mod(score, b, h, q_idx, kv_idx, *score_consts)` and `mask_mod(b, h, q_idx, kv_idx,
    *mask_consts)` are scalar functions, vmapped over each tile (`common.score_mod_tile`); the
    consts (every array they close over, hoisted by jattn.flex: score_mod's first) are kernel
    inputs that each program loads whole. Indices past T or S are clamped before the mods see
    them (those positions are masked anyway). The score_mod's derivative is JAX's (jax.vjp of
    the tile function in the backward kernels); its float consts' gradients are summed per dq
    program and reduced after. `block_mask`: (block_q, block_kv) when the key blocks come from
    a BlockMask's lists (empty blocks never visited, full ones without mask arithmetic; the
    kernels then tile by these blocks), None when every tile is visited (masked when there is a
    mask_mod). `vectors` (the Mosaic GPU kernel only, `jattn.flex._mosaic_vectors`): the mods
    close over no arrays but take two int32 values after kv_idx, one per query row and one per
    key column, which that kernel loads as its segment ids' vectors.
    """

    score_mod: Callable | None
    mask_mod: Callable | None
    num_score_consts: int
    const_shapes: tuple[tuple[int, ...], ...]
    block_mask: tuple[int, int] | None
    vectors: bool = False


class _Static(NamedTuple):
    """Everything that is not an array; it keys the custom_vjp closure and the kernels."""

    scale: float
    softcap: float | None
    right: int | None  # how far right of the diagonal a query sees (None: unbounded)
    left: int | None  # how far left
    check_q_len: bool  # query lengths given: rows past them see nothing
    check_kv_len: bool  # key lengths given or S padded: keys past kv_len are hidden
    dense_masks: bool  # segment ids or a boolean mask: every tile is masked
    groups: int  # G = N // K
    head_dim: int  # H before padding
    q_len: int  # T before padding
    kv_len: int  # S before padding
    block_q: int
    block_k: int
    bwd_block_q: int
    bwd_block_k: int
    num_warps: int
    num_stages: int
    bwd_num_warps: int
    bwd_num_stages: int
    interpret: bool
    flex: FlexSpec | None = None  # jattn.flex_attention: the user's mods (no other option then)


# --- tile math shared by the three kernels ----------------------------------------------------


def _bounds(x):
    """The per-batch scalars: (q_offset, q_len, kv_len)."""
    return x["bounds"][0], x["bounds"][1], x["bounds"][2]


def _precision(dtype):
    """float32 inputs get full-precision dots (no TF32); half types use the tensor cores."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _finite_keys(k, v):
    """(k, v, bad): keys whose k or v holds NaN/inf zeroed, and which they were ([bk] bool).

    Masked tiles multiply by these copies: a hidden key's NaN must not enter a dot as 0 * NaN.
    The rows that do see a bad key get NaN logits there (`_tile_logits`), so they stay NaN."""
    finite = jnp.isfinite(k) & jnp.isfinite(v)  # [bk, Hp]
    bad = jnp.max(jnp.where(finite, 0.0, 1.0), axis=1) > 0.0  # [bk]
    zero = jnp.zeros((), k.dtype)
    return jnp.where(bad[:, None], zero, k), jnp.where(bad[:, None], zero, v), bad


def _tile_logits(
    st: _Static,
    x,
    q,
    k,
    q_pos,
    k_pos,
    bias_tile,
    mask_tile,
    q_seg,
    kv_seg,
    masked: bool,
    bad_keys=None,
    flex=None,
):
    """One tile: (scale * q.k if soft-capped else None, base-2 logits, -inf where hidden,
    visibility).

    q: [bq, Hp], k: [bk, Hp]; returns [bq, bk] float32 arrays (visibility None: all visible).
    `masked=False` is for tiles known to be fully visible: no mask is built. `bad_keys` [bk]:
    keys zeroed by `_finite_keys`; their visible logits become NaN. `flex`: the program's
    `_flex_context` (flex_attention: scores are scale * q.k, logits score_mod(scores)).
    """
    q_offset, q_len, kv_len = _bounds(x)
    qk = pltriton.dot(q, k, trans_b=True, precision=_precision(q.dtype))
    if st.flex is not None:
        scores = qk * st.scale
        logits = scores
        if st.flex.score_mod is not None:
            logits = _flex_scores(st, scores, q_pos, k_pos, flex)
        logits = logits * _LOG2E
    elif st.softcap is None:  # one multiply per element: scale and the base-2 change together
        scores = None  # only the soft cap's gradient needs them
        logits = qk * (st.scale * _LOG2E)
        if bias_tile is not None:
            logits = logits + bias_tile.astype(jnp.float32) * _LOG2E
    else:
        scores = qk * st.scale
        logits = common.capped_logits(scores, st.softcap)
        if bias_tile is not None:
            logits = logits + bias_tile.astype(jnp.float32)
        logits = logits * _LOG2E
    if not masked:
        return scores, logits, None
    visible = common.tile_visibility(
        q_pos,
        k_pos,
        q_offset=q_offset,
        q_len=q_len,
        kv_len=kv_len,
        right=st.right,
        left=st.left,
        check_q_len=st.check_q_len,
        check_kv_len=st.check_kv_len,
        q_seg=q_seg,
        kv_seg=kv_seg,
    )
    if mask_tile is not None:
        user = mask_tile != 0
        visible = user if visible is None else visible & user
    if st.flex is not None and st.flex.mask_mod is not None:
        b, h, consts = flex
        q_idx, k_idx = _flex_indices(st, q_pos, k_pos)
        user = common.mask_mod_tile(
            st.flex.mask_mod, b, h, q_idx, k_idx, consts[st.flex.num_score_consts :]
        )
        visible = user if visible is None else visible & user
    if bad_keys is not None:
        logits = jnp.where(bad_keys[None, :], jnp.nan, logits)
    if visible is not None:
        logits = jnp.where(visible, logits, -jnp.inf)
    return scores, logits, visible


def _key_blocks(st: _Static, x, q_first, block_q: int, block_k: int):
    """(lo, inner_lo, inner_hi, hi): the key blocks queries [q_first, +block_q) visit, and the
    inner part [inner_lo, inner_hi) that they see in full (no mask needed)."""
    q_offset, q_len, kv_len = _bounds(x)
    reach = dict(right=st.right, left=st.left)
    q_stop = jnp.minimum(q_first + block_q, q_len)
    lo, hi = common.key_block_range(
        q_first, q_stop, q_offset=q_offset, kv_len=kv_len, block_k=block_k, **reach
    )
    inner_lo, inner_hi = common.unmasked_key_blocks(
        lo,
        hi,
        q_first,
        q_offset=q_offset,
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
        check_q_len=st.check_q_len,
        check_kv_len=st.check_kv_len,
        **reach,
    )
    return lo, inner_lo, inner_hi, hi


def _query_blocks(st: _Static, x, k_first, block_q: int, block_k: int):
    """(lo, inner_lo, inner_hi, hi): the query blocks that see keys [k_first, +block_k), and
    the inner part whose queries see all of them."""
    q_offset, q_len, kv_len = _bounds(x)
    reach = dict(right=st.right, left=st.left)
    k_stop = jnp.minimum(k_first + block_k, kv_len)
    lo, hi = common.query_block_range(
        k_first, k_stop, q_offset=q_offset, q_len=q_len, block_q=block_q, **reach
    )
    inner_lo, inner_hi = common.unmasked_query_blocks(
        lo,
        hi,
        k_first,
        q_offset=q_offset,
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
        check_q_len=st.check_q_len,
        check_kv_len=st.check_kv_len,
        **reach,
    )
    return lo, inner_lo, inner_hi, hi


def _slice(x, name: str, rows=None, cols=None):
    """Load x[name][rows, cols] (either may be None for 'all'); None when the input is absent."""
    if name not in x:
        return None
    ref = x[name]
    if ref.ndim == 1:
        return ref[rows if rows is not None else slice(None)]
    return ref[
        rows if rows is not None else slice(None),
        cols if cols is not None else slice(None),
    ]


# --- flex_attention: the user's mods ------------------------------------------------------------


def _flex_context(st: _Static, x):
    """(b, h, consts) for the mods of this program (grid axes 1, 2: batch, query head); None
    without flex. The consts stay in memory (`common.ConstRef`): the mods load what they read."""
    if st.flex is None:
        return None
    consts = tuple(
        common.ConstRef(x[f"flex_const{i}"], shape) for i, shape in enumerate(st.flex.const_shapes)
    )
    return pl.program_id(1), pl.program_id(2), consts


def _flex_indices(st: _Static, q_pos, k_pos):
    """Positions clamped into [0, T) and [0, S): padding rows and keys (masked) never make a
    mod index a closed-over array out of range."""
    return jnp.minimum(q_pos, st.q_len - 1), jnp.minimum(k_pos, st.kv_len - 1)


def _flex_scores(st: _Static, scores, q_pos, k_pos, flex, score_consts=None):
    """score_mod over a [bq, bk] tile of scale * q.k (float32)."""
    b, h, consts = flex
    if score_consts is None:
        score_consts = consts[: st.flex.num_score_consts]
    q_idx, k_idx = _flex_indices(st, q_pos, k_pos)
    return common.score_mod_tile(st.flex.score_mod, scores, b, h, q_idx, k_idx, score_consts)


def _flex_score_grad(st: _Static, scores, d_logits, q_pos, k_pos, flex, dconst_refs=()):
    """d scores from d logits: the vjp of score_mod's tile function, by JAX.

    dconst_refs: {score const index: this program's flat float32 gradient ref}. The mod's
    reads of those consts are recorded (`common.ReadTape`: flat index and value per element),
    the vjp is taken with respect to the values read, and each read's cotangent is added at
    its index: with atomics on a GPU (duplicate indices within a tile add up), by a scatter-add
    in interpret mode (whose atomic_add drops duplicates)."""
    if st.flex.score_mod is None:
        return d_logits
    b, h, consts = flex
    consts = consts[: st.flex.num_score_consts]
    q_idx, k_idx = _flex_indices(st, q_pos, k_pos)
    if not dconst_refs:
        _, vjp = jax.vjp(lambda s: _flex_scores(st, s, q_pos, k_pos, flex), scores)
        return vjp(d_logits)[0]
    read_from = []  # const index of each recorded read, in the mod's order

    def taped(tape):
        return tuple(
            common.TapedConstRef(c, tape, i) if i in dconst_refs else c
            for i, c in enumerate(consts)
        )

    def record(s, q, k):
        tape = common.ReadTape()
        out = st.flex.score_mod(s, b, h, q, k, *taped(tape))
        read_from[:] = tape.sources
        return out, tape.indices, tape.values

    def replay(s, q, k, values):
        return st.flex.score_mod(s, b, h, q, k, *taped(common.ReadTape(values)))

    def tile(fn, *args):
        return jax.vmap(jax.vmap(fn, in_axes=(0, None, 0, 0)), in_axes=(0, 0, None, 0))(*args)

    record_tile = jax.vmap(jax.vmap(record, in_axes=(0, None, 0)), in_axes=(0, 0, None))
    _, indices, values = record_tile(scores, q_idx, k_idx)  # lists of [bq, bk]

    def modded(s, values):
        out = tile(replay, s, q_idx, k_idx, values)
        return jnp.broadcast_to(out, scores.shape).astype(scores.dtype)

    _, vjp = jax.vjp(modded, scores, list(values))
    d_scores, d_values = vjp(d_logits)
    for source, index, d_value in zip(read_from, indices, d_values, strict=True):
        ref = dconst_refs[source]
        d_value = d_value.astype(jnp.float32)
        if st.interpret:
            flat = jnp.zeros(ref.shape, jnp.float32).at[index.reshape(-1)]
            ref[...] = ref[...] + flat.add(d_value.reshape(-1))
        else:
            pltriton.atomic_add(ref, (index,), d_value)
    return d_scores


def _visit_all(st: _Static, x, ranges, visit, carry):
    """`common.visit_all`, or with a block mask the blocks it lists for this program: partial
    ones masked, full ones unmasked; empty ones are never visited (their tiles never loaded)."""
    if st.flex is None or st.flex.block_mask is None:
        return common.visit_all(st, ranges, visit, carry)
    blocks = x["flex_blocks"]  # [2 + 2 n] int32: n_partial, n_full, partial ids, full ids
    n = (blocks.shape[0] - 2) // 2

    def partial(t, c):
        return visit(blocks[2 + t], c, masked=True)

    def full(t, c):
        return visit(blocks[2 + n + t], c, masked=False)

    carry = lax.fori_loop(0, blocks[0], partial, carry)
    return lax.fori_loop(0, blocks[1], full, carry)


# --- forward ------------------------------------------------------------------------------------


def _forward_kernel(
    x,  # dict of refs: query [bq, Hp], key/value [S_pad, Hp], bias/mask [bq, S_pad],
    #     q_seg [bq], kv_seg [S_pad], bounds [4]
    o_ref,  # [bq, Hp]
    lse_ref,  # [bq] float32
    *,
    st: _Static,
):
    block_q, block_k = st.block_q, st.block_k
    q_first = pl.program_id(0) * block_q
    q_pos = q_first + jnp.arange(block_q, dtype=jnp.int32)
    q = x["query"][...]
    q_seg = _slice(x, "q_seg")
    head_dims = q.shape[-1]
    flex = _flex_context(st, x)

    def visit(j, carry, masked):
        acc, row_max, row_sum = carry
        k_first = j * block_k
        keys = pl.ds(k_first, block_k)
        k_pos = k_first + jnp.arange(block_k, dtype=jnp.int32)
        k, v, bad = x["key"][keys, :], x["value"][keys, :], None
        if masked:
            k, v, bad = _finite_keys(k, v)
        _, logits, _ = _tile_logits(
            st,
            x,
            q,
            k,
            q_pos,
            k_pos,
            _slice(x, "bias", cols=keys),
            _slice(x, "mask", cols=keys),
            q_seg,
            _slice(x, "kv_seg", keys),
            masked,
            bad,
            flex,
        )
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # rows with nothing seen yet
        probs = jnp.exp2(logits - safe_max[:, None])  # [bq, bk]
        correction = jnp.exp2(row_max - safe_max)
        row_sum = correction * row_sum + jnp.sum(probs, axis=-1)
        pv = pltriton.dot(probs.astype(v.dtype), v, precision=_precision(v.dtype))
        return acc * correction[:, None] + pv, new_max, row_sum

    init = (
        jnp.zeros((block_q, head_dims), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    ranges = _key_blocks(st, x, q_first, block_q, block_k)
    acc, row_max, row_sum = _visit_all(st, x, ranges, visit, init)
    has_keys = row_sum != 0  # NaN (a row that sees a non-finite key) stays NaN
    safe_sum = jnp.where(has_keys, row_sum, 1.0)
    o_ref[...] = (acc / safe_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, row_max * _LN2 + jnp.log(safe_sum), -jnp.inf)


# --- backward: dq (and dbias) -------------------------------------------------------------------


def _dq_kernel(
    x,  # dict of refs: query/d_out [bq, Hp], lse/delta [bq], key/value [S_pad, Hp],
    #     bias/mask [bq, S_pad], q_seg [bq], kv_seg [S_pad], bounds [4]
    *out_refs,  # dq [bq, Hp] and/or dbias [bq, S_pad] float32, then d flex consts [shape]
    st: _Static,
    want_dq: bool,
    want_dbias: bool,
    want_dconsts: tuple[int, ...] = (),
):
    out_refs = list(out_refs)
    dq_ref = out_refs.pop(0) if want_dq else None
    dbias_ref = out_refs.pop(0) if want_dbias else None
    # per program: d score const want_dconsts[i], flat (padded to a power of two)
    dconst_refs = dict(zip(want_dconsts, out_refs, strict=True))
    block_q, block_k = st.bwd_block_q, st.bwd_block_k
    q_first = pl.program_id(0) * block_q
    q_pos = q_first + jnp.arange(block_q, dtype=jnp.int32)
    q, d_out = x["query"][...], x["d_out"][...]
    lse, delta = x["lse"][...], x["delta"][...]  # [bq] float32
    # Rows that see nothing: p is 0 anyway. A NaN lse (a poisoned row) keeps its gradient NaN.
    lse2 = jnp.where(lse == -jnp.inf, 0.0, lse * _LOG2E)
    q_seg = _slice(x, "q_seg")
    flex = _flex_context(st, x)

    def visit(j, dq, masked):
        k_first = j * block_k
        keys = pl.ds(k_first, block_k)
        k_pos = k_first + jnp.arange(block_k, dtype=jnp.int32)
        k, v, bad = x["key"][keys, :], x["value"][keys, :], None
        if masked:
            k, v, bad = _finite_keys(k, v)
        scores, logits, visible = _tile_logits(
            st,
            x,
            q,
            k,
            q_pos,
            k_pos,
            _slice(x, "bias", cols=keys),
            _slice(x, "mask", cols=keys),
            q_seg,
            _slice(x, "kv_seg", keys),
            masked,
            bad,
            flex,
        )
        probs = jnp.exp2(logits - lse2[:, None])
        if visible is not None:
            probs = jnp.where(visible, probs, 0.0)
        d_probs = pltriton.dot(d_out, v, trans_b=True, precision=_precision(v.dtype))
        d_logits = probs * (d_probs - delta[:, None])  # [bq, bk]
        if visible is not None:  # a poisoned row's NaN delta must not reach hidden keys
            d_logits = jnp.where(visible, d_logits, 0.0)
        if want_dbias:
            dbias_ref[:, keys] = d_logits
        if not want_dq:
            return dq
        if st.flex is None:
            d_scores = d_logits * (common.capped_logits_grad(scores, st.softcap) * st.scale)
        else:
            d_scores = _flex_score_grad(st, scores, d_logits, q_pos, k_pos, flex, dconst_refs)
            d_scores = d_scores * st.scale
        return dq + pltriton.dot(d_scores.astype(k.dtype), k, precision=_precision(k.dtype))

    def zero_dbias(j, carry):  # tiles no query of this block sees: dbias is exactly 0
        dbias_ref[:, pl.ds(j * block_k, block_k)] = jnp.zeros((block_q, block_k), jnp.float32)
        return carry

    ranges = _key_blocks(st, x, q_first, block_q, block_k)
    lo, hi = ranges[0], ranges[-1]
    for ref in dconst_refs.values():
        ref[...] = jnp.zeros(ref.shape, jnp.float32)
    dq = _visit_all(st, x, ranges, visit, jnp.zeros(q.shape, jnp.float32))
    if want_dbias:
        lax.fori_loop(0, lo, zero_dbias, 0)
        lax.fori_loop(hi, dbias_ref.shape[1] // block_k, zero_dbias, 0)
    if want_dq:
        dq_ref[...] = dq.astype(dq_ref.dtype)


# --- backward: dk, dv ---------------------------------------------------------------------------


def _dkdv_kernel(
    x,  # dict of refs: query/d_out [T_pad, Hp], lse/delta [T_pad], key/value [bk, Hp],
    #     bias/mask [T_pad, bk], q_seg [T_pad], kv_seg [bk], bounds [4]
    dk_ref,  # [bk, Hp] (float32 when G > 1: summed over the group afterwards)
    dv_ref,  # [bk, Hp]
    *,
    st: _Static,
):
    block_q, block_k = st.bwd_block_q, st.bwd_block_k
    k_first = pl.program_id(0) * block_k
    k_pos = k_first + jnp.arange(block_k, dtype=jnp.int32)
    k, v = x["key"][...], x["value"][...]
    # Zeroed NaN/inf keys for the masked tiles (the unmasked ones: every query sees every key).
    clean_k, clean_v, bad = _finite_keys(k, v)
    kv_seg = _slice(x, "kv_seg")
    flex = _flex_context(st, x)

    def visit(i, carry, masked):
        dk, dv = carry
        q_first = i * block_q
        rows = pl.ds(q_first, block_q)
        q_pos = q_first + jnp.arange(block_q, dtype=jnp.int32)
        q, d_out = x["query"][rows, :], x["d_out"][rows, :]
        lse, delta = x["lse"][rows], x["delta"][rows]
        lse2 = jnp.where(lse == -jnp.inf, 0.0, lse * _LOG2E)
        tile_k, tile_v = (clean_k, clean_v) if masked else (k, v)
        scores, logits, visible = _tile_logits(
            st,
            x,
            q,
            tile_k,
            q_pos,
            k_pos,
            _slice(x, "bias", rows=rows),
            _slice(x, "mask", rows=rows),
            _slice(x, "q_seg", rows),
            kv_seg,
            masked,
            bad if masked else None,
            flex,
        )
        probs = jnp.exp2(logits - lse2[:, None])  # [bq, bk]
        if visible is not None:
            probs = jnp.where(visible, probs, 0.0)
        dv = dv + pltriton.dot(
            probs.astype(d_out.dtype), d_out, trans_a=True, precision=_precision(d_out.dtype)
        )
        d_probs = pltriton.dot(d_out, tile_v, trans_b=True, precision=_precision(v.dtype))
        d_logits = probs * (d_probs - delta[:, None])
        if visible is not None:  # a poisoned row's NaN delta must not reach hidden keys
            d_logits = jnp.where(visible, d_logits, 0.0)
        if st.flex is None:
            d_scores = d_logits * (common.capped_logits_grad(scores, st.softcap) * st.scale)
        else:
            d_scores = _flex_score_grad(st, scores, d_logits, q_pos, k_pos, flex) * st.scale
        dk = dk + pltriton.dot(
            d_scores.astype(q.dtype), q, trans_a=True, precision=_precision(q.dtype)
        )
        return dk, dv

    ranges = _query_blocks(st, x, k_first, block_q, block_k)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _visit_all(st, x, ranges, visit, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --- launching ----------------------------------------------------------------------------------


class _Inputs(NamedTuple):
    """Padded kernel inputs. Shapes: [B, T_pad, N, Hp] query, [B, S_pad, K, Hp] key/value."""

    query: Array
    key: Array
    value: Array
    bias: Array | None  # [B', N', T_pad, S_pad] (B', N' in {1, full})
    mask: Array | None  # [B', N', T_pad, S_pad] int8
    q_seg: Array | None  # [B, T_pad] int32
    kv_seg: Array | None  # [B, S_pad] int32
    bounds: Array  # [B, 4] int32: q_offset, q_len, kv_len, 0
    flex_consts: tuple[Array, ...] = ()  # the mods' arrays, flattened
    flex_blocks: tuple[Array, ...] = ()  # BlockMask (kv_blocks, q_blocks) [B', N', rows, cols]


def _padded_lengths(st: _Static) -> tuple[int, int]:
    q_multiple = max(st.block_q, st.bwd_block_q)
    k_multiple = max(st.block_k, st.bwd_block_k)
    return -(-st.q_len // q_multiple) * q_multiple, -(-st.kv_len // k_multiple) * k_multiple


def _pairwise(x: Array | None, st: _Static, dtype=None) -> Array | None:
    """bias/mask [B', N', T', S'] -> [B', N', T_pad, S_pad] (T', S' broadcast, then padded)."""
    if x is None:
        return None
    t_pad, s_pad = _padded_lengths(st)
    x = jnp.broadcast_to(x, x.shape[:2] + (st.q_len, st.kv_len))
    if dtype is not None:
        x = x.astype(dtype)
    return common.pad_to(common.pad_to(x, 2, t_pad), 3, s_pad)


def _prepare(st: _Static, query, key, value, bias, aux) -> _Inputs:
    mask, q_offset, q_lengths, kv_lengths, q_ids, kv_ids, *flex = aux
    flex_consts, flex_blocks = flex[0] if flex else ((), ())
    batch = query.shape[0]
    t_pad, s_pad = _padded_lengths(st)
    h_pad = common.padded_head_dim(st.head_dim)

    def rows(x, size):  # [B, L, heads, H] -> [B, size, heads, Hp]
        return common.pad_last(common.pad_to(x, 1, size), h_pad)

    def per_batch(x, default, limit=None):
        if x is None:
            return jnp.full((batch,), default, jnp.int32)
        x = x.astype(jnp.int32)
        # A length past T or S would make the zero padding of the last block visible.
        return x if limit is None else jnp.clip(x, 0, limit)

    bounds = jnp.stack(
        [
            per_batch(q_offset, 0),
            per_batch(q_lengths, st.q_len, st.q_len),
            per_batch(kv_lengths, st.kv_len, st.kv_len),
            jnp.zeros((batch,), jnp.int32),
        ],
        axis=1,
    )
    return _Inputs(
        query=rows(query, t_pad),
        key=rows(key, s_pad),
        value=rows(value, s_pad),
        bias=_pairwise(bias, st),
        mask=_pairwise(mask, st, jnp.int8),
        q_seg=None if q_ids is None else common.pad_to(q_ids, 1, t_pad, -1),
        kv_seg=None if kv_ids is None else common.pad_to(kv_ids, 1, s_pad, -2),
        bounds=bounds,
        flex_consts=tuple(c.reshape(-1) for c in flex_consts),
        flex_blocks=tuple(flex_blocks),
    )


def _pair_index(x: Array, b, n, row_block, col_block):
    """Index map of a [B', N', T, S] operand that broadcasts over B' or N' == 1."""
    return (b if x.shape[0] > 1 else 0, n if x.shape[1] > 1 else 0, row_block, col_block)


def _query_tiled_specs(inputs: _Inputs, block_q: int, groups: int):
    """Operands and BlockSpecs for a kernel with a program per (query tile i, batch b, head n)."""
    s_pad, h_pad = inputs.key.shape[1], inputs.query.shape[-1]
    operands = {"query": inputs.query, "key": inputs.key, "value": inputs.value}
    specs = {
        "query": pl.BlockSpec((None, block_q, None, h_pad), lambda i, b, n: (b, i, n, 0)),
        "key": pl.BlockSpec((None, s_pad, None, h_pad), lambda i, b, n: (b, 0, n // groups, 0)),
        "value": pl.BlockSpec((None, s_pad, None, h_pad), lambda i, b, n: (b, 0, n // groups, 0)),
        "bounds": pl.BlockSpec((None, 4), lambda i, b, n: (b, 0)),
    }
    operands["bounds"] = inputs.bounds
    for name in ("bias", "mask"):
        x = getattr(inputs, name)
        if x is not None:
            operands[name] = x
            specs[name] = pl.BlockSpec(
                (None, None, block_q, s_pad),
                functools.partial(lambda x, i, b, n: _pair_index(x, b, n, i, 0), x),
            )
    if inputs.q_seg is not None:
        operands["q_seg"], operands["kv_seg"] = inputs.q_seg, inputs.kv_seg
        specs["q_seg"] = pl.BlockSpec((None, block_q), lambda i, b, n: (b, i))
        specs["kv_seg"] = pl.BlockSpec((None, s_pad), lambda i, b, n: (b, 0))
    _flex_specs(inputs, operands, specs, 0)
    return operands, specs


def _flex_specs(inputs: _Inputs, operands: dict, specs: dict, which: int) -> None:
    """Add the mods' arrays (whole, to every program) and the block mask's lists for a grid
    (tile, b, n): which=0 kv_blocks (a row per query tile), 1 q_blocks (per key tile)."""
    for i, c in enumerate(inputs.flex_consts):
        operands[f"flex_const{i}"] = c
        specs[f"flex_const{i}"] = pl.BlockSpec(c.shape, lambda t, b, n, rank=c.ndim: (0,) * rank)
    if inputs.flex_blocks:
        blocks = inputs.flex_blocks[which]  # [B', N', tiles, 2 + 2 * other tiles]
        operands["flex_blocks"] = blocks
        specs["flex_blocks"] = pl.BlockSpec(
            (None, None, None, blocks.shape[-1]),
            functools.partial(lambda x, t, b, n: _pair_index(x, b, n, t, 0), blocks),
        )


def _forward(st: _Static, query, key, value, bias, aux):
    inputs = _prepare(st, query, key, value, bias, aux)
    batch, t_pad, num_heads, h_pad = inputs.query.shape
    operands, specs = _query_tiled_specs(inputs, st.block_q, st.groups)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, st=st),
        grid=(t_pad // st.block_q, batch, num_heads),
        in_specs=[specs],
        out_specs=[
            pl.BlockSpec((None, st.block_q, None, h_pad), lambda i, b, n: (b, i, n, 0)),
            pl.BlockSpec((None, None, st.block_q), lambda i, b, n: (b, n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(inputs.query.shape, query.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32),
        ],
        compiler_params=common.triton_params(st.num_warps, st.num_stages),
        interpret=st.interpret,
        name="jattn_flash_forward",
    )(operands)
    return out, lse  # [B, T_pad, N, Hp], [B, N, T_pad]


def _backward(
    st: _Static,
    query,
    key,
    value,
    bias,
    aux,
    out_padded,
    lse_padded,
    d_out,
    d_lse,
    *,
    want_dbias,
    want_dconsts: tuple[int, ...] = (),
):
    inputs = _prepare(st, query, key, value, bias, aux)
    batch, t_pad, num_heads, h_pad = inputs.query.shape
    s_pad = inputs.key.shape[1]
    num_kv_heads = key.shape[2]
    # delta = rowsum(dO * O) - d_lse: an lse cotangent enters the softmax gradient like -delta.
    d_out_padded = common.pad_last(common.pad_to(d_out.astype(query.dtype), 1, t_pad), h_pad)
    delta = jnp.einsum(
        "bthd,bthd->bht",
        d_out_padded.astype(jnp.float32),
        out_padded.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    delta = delta - common.pad_to(jnp.swapaxes(d_lse.astype(jnp.float32), 1, 2), 2, t_pad)

    # dq (and dbias): a program per query tile.
    operands, specs = _query_tiled_specs(inputs, st.bwd_block_q, st.groups)
    operands.update(d_out=d_out_padded, lse=lse_padded, delta=delta)
    row_spec = pl.BlockSpec((None, st.bwd_block_q, None, h_pad), lambda i, b, n: (b, i, n, 0))
    specs.update(
        d_out=row_spec,
        lse=pl.BlockSpec((None, None, st.bwd_block_q), lambda i, b, n: (b, n, i)),
        delta=pl.BlockSpec((None, None, st.bwd_block_q), lambda i, b, n: (b, n, i)),
    )
    grid = (t_pad // st.bwd_block_q, batch, num_heads)
    params = common.triton_params(st.bwd_num_warps, st.bwd_num_stages)
    # flex: a [shape] tile sum of each differentiated score const per program, reduced after.
    const_shapes = [(_power_of_two(inputs.flex_consts[i].size),) for i in want_dconsts]
    dq, *d_consts = pl.pallas_call(
        functools.partial(
            _dq_kernel, st=st, want_dq=True, want_dbias=False, want_dconsts=want_dconsts
        ),
        grid=grid,
        in_specs=[specs],
        out_specs=[row_spec]
        + [
            pl.BlockSpec(
                (None, None, None, *shape),
                functools.partial(lambda r, i, b, n: (i, b, n) + (0,) * r, len(shape)),
            )
            for shape in const_shapes
        ],
        out_shape=[jax.ShapeDtypeStruct(inputs.query.shape, query.dtype)]
        + [jax.ShapeDtypeStruct(grid + shape, jnp.float32) for shape in const_shapes],
        compiler_params=params,
        interpret=st.interpret,
        name="jattn_flash_dq",
    )(operands)
    d_bias = None
    if want_dbias:  # [B, N, T_pad, S_pad] float32 tiles of dS, summed to the bias's shape
        (dbias_full,) = pl.pallas_call(
            functools.partial(_dq_kernel, st=st, want_dq=False, want_dbias=True),
            grid=grid,
            in_specs=[specs],
            out_specs=[
                pl.BlockSpec((None, None, st.bwd_block_q, s_pad), lambda i, b, n: (b, n, i, 0))
            ],
            out_shape=[jax.ShapeDtypeStruct((batch, num_heads, t_pad, s_pad), jnp.float32)],
            compiler_params=params,
            interpret=st.interpret,
            name="jattn_flash_dbias",
        )(operands)
        dbias_full = dbias_full[:, :, : st.q_len, : st.kv_len]
        broadcast_axes = tuple(a for a in range(4) if bias.shape[a] == 1)
        d_bias = jnp.sum(dbias_full, axis=broadcast_axes, keepdims=True).astype(bias.dtype)

    # dk, dv: a program per key tile and query head; summed over the G heads of a group after.
    groups = st.groups
    kv_operands = {
        "query": inputs.query,
        "d_out": d_out_padded,
        "lse": lse_padded,
        "delta": delta,
        "key": inputs.key,
        "value": inputs.value,
        "bounds": inputs.bounds,
    }
    full_rows = pl.BlockSpec((None, t_pad, None, h_pad), lambda j, b, n: (b, 0, n, 0))
    per_row = pl.BlockSpec((None, None, t_pad), lambda j, b, n: (b, n, 0))
    key_tile = pl.BlockSpec(
        (None, st.bwd_block_k, None, h_pad), lambda j, b, n: (b, j, n // groups, 0)
    )
    kv_specs = {
        "query": full_rows,
        "d_out": full_rows,
        "lse": per_row,
        "delta": per_row,
        "key": key_tile,
        "value": key_tile,
        "bounds": pl.BlockSpec((None, 4), lambda j, b, n: (b, 0)),
    }
    for name in ("bias", "mask"):
        x = getattr(inputs, name)
        if x is not None:
            kv_operands[name] = x
            kv_specs[name] = pl.BlockSpec(
                (None, None, t_pad, st.bwd_block_k),
                functools.partial(lambda x, j, b, n: _pair_index(x, b, n, 0, j), x),
            )
    if inputs.q_seg is not None:
        kv_operands["q_seg"], kv_operands["kv_seg"] = inputs.q_seg, inputs.kv_seg
        kv_specs["q_seg"] = pl.BlockSpec((None, t_pad), lambda j, b, n: (b, 0))
        kv_specs["kv_seg"] = pl.BlockSpec((None, st.bwd_block_k), lambda j, b, n: (b, j))
    _flex_specs(inputs, kv_operands, kv_specs, 1)
    grad_dtype = key.dtype if groups == 1 else jnp.float32
    per_head = jax.ShapeDtypeStruct((batch, s_pad, num_heads, h_pad), grad_dtype)
    out_tile = pl.BlockSpec((None, st.bwd_block_k, None, h_pad), lambda j, b, n: (b, j, n, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        grid=(s_pad // st.bwd_block_k, batch, num_heads),
        in_specs=[kv_specs],
        out_specs=[out_tile, out_tile],
        out_shape=[per_head, per_head],
        compiler_params=params,
        interpret=st.interpret,
        name="jattn_flash_dkdv",
    )(kv_operands)

    def kv_grad(g):  # [B, S_pad, N, Hp] -> [B, S, K, H]
        g = g[:, : st.kv_len, :, : st.head_dim]
        g = g.reshape(batch, st.kv_len, num_kv_heads, groups, st.head_dim).sum(axis=3)
        return g.astype(key.dtype)

    d_query = dq[:, : st.q_len, :, : st.head_dim]
    d_aux = None
    if st.flex is not None:  # cotangents of aux: only the differentiated score consts
        consts = aux[6][0]
        d_flex = [None] * len(consts)
        for i, d_const in zip(want_dconsts, d_consts, strict=True):
            d_const = d_const.sum(axis=(0, 1, 2))[: consts[i].size]
            d_flex[i] = d_const.reshape(consts[i].shape).astype(consts[i].dtype)
        d_aux = (None,) * 6 + ((tuple(d_flex), None),)
    return d_query, kv_grad(dk), kv_grad(dv), d_bias, d_aux


def _instantiate(cotangent, like: jax.ShapeDtypeStruct) -> Array:
    """A symbolic-zero cotangent as zeros (other cotangents pass through)."""
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(like.shape, like.dtype)
    return cotangent


@functools.cache
def _attention_vjp(st: _Static):
    def unpad(out, lse):
        out = out[:, : st.q_len, :, : st.head_dim]
        return out, jnp.swapaxes(lse[:, :, : st.q_len], 1, 2)  # [B, T, N, H], [B, T, N]

    @jax.custom_vjp
    def attention(query, key, value, bias, aux):
        return unpad(*_forward(st, query, key, value, bias, aux))

    # symbolic_zeros: the forward learns whether the bias is differentiated at all, so the
    # backward launches the dbias kernel only when someone wants dbias.
    def forward_rule(query, key, value, bias, aux):
        primals = [x.value for x in (query, key, value)]
        bias_value = jax.tree.map(lambda b: b.value, bias)
        aux_value = jax.tree.map(lambda a: a.value, aux)
        out, lse = _forward(st, *primals, bias_value, aux_value)
        want_dbias = bias_value is not None and bias.perturbed
        # flex: which score consts are differentiated, as pytree structure (() yes, None no)
        dconsts = ()
        if st.flex is not None:
            dconsts = tuple(
                () if c.perturbed and jnp.issubdtype(c.value.dtype, jnp.inexact) else None
                for c in aux[6][0][: st.flex.num_score_consts]
            )
        residuals = (
            *primals,
            bias_value,
            aux_value,
            out,
            lse,
            () if want_dbias else None,
            dconsts,
        )
        return unpad(out, lse), residuals

    def backward_rule(residuals, cotangents):
        *inputs, out, lse, want_dbias, dconsts = residuals
        want_dconsts = tuple(i for i, flag in enumerate(dconsts) if flag is not None)
        query = inputs[0]
        d_out = _instantiate(cotangents[0], jax.ShapeDtypeStruct(query.shape, query.dtype))
        d_lse = _instantiate(cotangents[1], jax.ShapeDtypeStruct(query.shape[:3], jnp.float32))
        return _backward(
            st,
            *inputs,
            out,
            lse,
            d_out,
            d_lse,
            want_dbias=want_dbias is not None,
            want_dconsts=want_dconsts,
        )

    attention.defvjp(forward_rule, backward_rule, symbolic_zeros=True)
    return attention


def _power_of_two(size: int) -> int:
    return 1 << max(size - 1, 0).bit_length()


def _fit(block: int, length: int) -> int:
    """A block no longer than the sequence needs (power of two >= 16)."""
    return min(block, max(_MIN_BLOCK, 1 << max(length - 1, 0).bit_length()))


def _static(
    query,
    key,
    bias,
    mask,
    config: TritonConfig | None,
    tuned: TritonConfig | None,
    *,
    scale,
    is_causal,
    query_seq_lengths,
    key_value_seq_lengths,
    local_window_size,
    segment_ids,
    logits_soft_cap,
    interpret,
) -> _Static:
    """The kernels' static parameters for one call: blocks fitted to T and S, masks in use.

    `config` is used as given; without one, `tuned` or else `default_config` is shrunk to fit
    shared memory (bias and mask tiles add to it)."""
    _, q_len, num_heads, head_dim = query.shape
    if config is None:
        config = _fit_shared_memory(
            default_config(head_dim, query.dtype) if tuned is None else tuned,
            head_dim=common.padded_head_dim(head_dim),
            itemsize=query.dtype.itemsize,
            pair_itemsize=(0 if bias is None else bias.dtype.itemsize) + (mask is not None),
        )
    dense_masks = mask is not None or segment_ids is not None
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    block_q, bwd_block_q = _fit(config.block_q, q_len), _fit(config.bwd_block_q, q_len)
    block_k, bwd_block_k = _fit(config.block_k, kv_len), _fit(config.bwd_block_k, kv_len)
    k_multiple = max(block_k, bwd_block_k)
    st = _Static(
        scale=float(scale),
        softcap=logits_soft_cap,
        right=common.right_reach(is_causal, local_window_size),
        left=common.left_reach(local_window_size),
        check_q_len=query_seq_lengths is not None,
        check_kv_len=key_value_seq_lengths is not None or kv_len % k_multiple != 0,
        dense_masks=dense_masks,
        groups=num_heads // num_kv_heads,
        head_dim=head_dim,
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
        bwd_block_q=bwd_block_q,
        bwd_block_k=bwd_block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        bwd_num_warps=config.bwd_num_warps,
        bwd_num_stages=config.bwd_num_stages,
        interpret=common.interpret_mode() if interpret is None else interpret,
    )
    return st


def check_served(query: Array) -> None:
    """NotImplementedError for what the kernels do not serve: float64, H > 256."""
    if query.dtype not in _DTYPES:
        raise NotImplementedError(
            f"the Triton kernel serves float16/bfloat16/float32, not {query.dtype}"
        )
    head_dim = query.shape[-1]
    if head_dim > 256:
        raise NotImplementedError(f"the Triton kernel serves head dims up to 256, got {head_dim}")


def flash_attention(
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
    config: TritonConfig | None = None,
    tuned: TritonConfig | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array]:  # [B, T, N, H] in query.dtype, lse [B, T, N] float32
    """Flash attention with validated, rank-4 inputs (see `jattn.dot_product_attention`).

    `config` is used as given; without one, `tuned` (a stored config from `jattn.autotune`) or
    else `default_config` is shrunk to fit shared memory (bias and mask tiles add to it).
    Raises NotImplementedError for what the kernel does not serve (float64, H > 256).
    """
    check_served(query)
    st = _static(
        query,
        key,
        bias,
        mask,
        config,
        tuned,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
        interpret=interpret,
    )
    q_ids, kv_ids = (None, None) if segment_ids is None else segment_ids
    aux = (mask, q_offset, query_seq_lengths, key_value_seq_lengths, q_ids, kv_ids)
    return _attention_vjp(st)(query, key, value, bias, aux)


def backward(
    query: Array,  # [B, T, N, H]
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    bias: Array | None,
    mask: Array | None,
    out: Array,  # [B, T, N, H]: the forward's output
    lse: Array,  # [B, T, N] float32, natural log: the forward's log-sum-exp
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
    want_dbias: bool,
    config: TritonConfig | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array, Array, Array | None]:  # dq, dk, dv, dbias (None unless want_dbias)
    """This kernel's backward for a forward computed elsewhere (the Mosaic GPU kernel): the
    same dq and dk/dv kernels, fed with that forward's output and lse."""
    st = _static(
        query,
        key,
        bias,
        mask,
        config,
        None,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
        interpret=interpret,
    )
    out_padded, lse_padded = _padded_residuals(st, out, lse)
    q_ids, kv_ids = (None, None) if segment_ids is None else segment_ids
    aux = (mask, q_offset, query_seq_lengths, key_value_seq_lengths, q_ids, kv_ids)
    dq, dk, dv, d_bias, _ = _backward(
        st,
        query,
        key,
        value,
        bias,
        aux,
        out_padded,
        lse_padded,
        d_out,
        d_lse,
        want_dbias=want_dbias,
    )
    return dq, dk, dv, d_bias


def flex_attention(
    query: Array,  # [B, T, N, H]
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    flex: FlexSpec,
    consts: tuple[Array, ...],  # the mods' arrays: score_mod's, then mask_mod's
    blocks: tuple[Array, ...],  # () or a BlockMask's (kv_blocks, q_blocks)
    *,
    scale: float,
    config: TritonConfig | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array]:  # [B, T, N, H] in query.dtype, lse [B, T, N] float32
    """`jattn.flex_attention` on these kernels: validated inputs, the mods traced into every
    tile (no other option of `flash_attention`). With a block mask the tiles are its blocks."""
    if query.dtype not in _DTYPES:
        raise NotImplementedError(
            f"the Triton kernel serves float16/bfloat16/float32, not {query.dtype}; "
            "use implementation='xla'"
        )
    if query.shape[-1] > 256:
        raise NotImplementedError(
            f"the Triton kernel serves head dims up to 256, got {query.shape[-1]}"
        )
    if config is not None and not isinstance(config, TritonConfig):
        raise ValueError(f"triton needs a TritonConfig, got {type(config).__name__}")
    st = _flex_static(query, key, flex, scale=scale, config=config, interpret=interpret)
    aux = (None,) * 6 + ((tuple(consts), tuple(blocks)),)
    # Not through the cache: every call hoists its mods anew, so st would never repeat.
    return _attention_vjp.__wrapped__(st)(query, key, value, None, aux)


def _padded_residuals(st: _Static, out: Array, lse: Array) -> tuple[Array, Array]:
    """A forward's out [B, T, N, H] and lse [B, T, N], computed elsewhere, padded as this
    kernel's backward reads them: [B, T_pad, N, H_pad] and [B, N, T_pad] (padded rows: 0)."""
    t_pad, _ = _padded_lengths(st)
    out_padded = common.pad_last(common.pad_to(out, 1, t_pad), common.padded_head_dim(st.head_dim))
    return out_padded, common.pad_to(jnp.swapaxes(lse, 1, 2), 2, t_pad)


def flex_backward(
    query: Array,  # [B, T, N, H]
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    flex: FlexSpec,
    blocks: tuple[Array, ...],  # () or a BlockMask's (kv_blocks, q_blocks)
    out: Array,  # [B, T, N, H]: the forward's output
    lse: Array,  # [B, T, N] float32, natural log
    d_out: Array,  # [B, T, N, H]
    d_lse: Array,  # [B, T, N]
    *,
    scale: float,
    interpret: bool | None = None,
) -> tuple[Array, Array, Array]:  # dq, dk, dv
    """This kernel's flex backward for a forward computed elsewhere (the Mosaic GPU kernel's
    flex forward, whose mods close over no arrays): the dq and dk/dv kernels with the mods
    traced in, fed with that forward's output and lse."""
    st = _flex_static(query, key, flex, scale=scale, config=None, interpret=interpret)
    out_padded, lse_padded = _padded_residuals(st, out, lse)
    aux = (None,) * 6 + (((), tuple(blocks)),)
    dq, dk, dv, _, _ = _backward(
        st, query, key, value, None, aux, out_padded, lse_padded, d_out, d_lse, want_dbias=False
    )
    return dq, dk, dv


def _flex_static(query, key, flex: FlexSpec, *, scale, config, interpret) -> _Static:
    """The static of a flex call: no option but the mods; with a block mask its blocks are the
    tiles (the default's stages shed to fit them)."""
    if flex.block_mask is not None:
        block_q, block_k = flex.block_mask
        for name, size in (("block_q", block_q), ("block_kv", block_k)):
            if size < _MIN_BLOCK or size & (size - 1):
                raise NotImplementedError(
                    f"the Triton kernel tiles by the block mask's blocks, which must be powers "
                    f"of two >= {_MIN_BLOCK}: got {name}={size} (create_block_mask with such "
                    "blocks, or use implementation='xla')"
                )
        tiles = dict(block_q=block_q, block_k=block_k, bwd_block_q=block_q, bwd_block_k=block_k)
        if config is None:  # the default's stages, shed to fit these tiles
            config = _fit_stages_to_tiles(
                dataclasses.replace(default_config(query.shape[-1], query.dtype), **tiles),
                head_dim=common.padded_head_dim(query.shape[-1]),
                itemsize=query.dtype.itemsize,
                pair_itemsize=0,
            )
    off = dict(query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None)
    st = _static(
        query,
        key,
        None,
        None,
        config,
        None,
        scale=scale,
        is_causal=False,
        segment_ids=None,
        logits_soft_cap=None,
        interpret=interpret,
        **off,
    )
    if flex.block_mask is not None:  # exactly the mask's blocks (not fitted to T and S)
        st = st._replace(**tiles)
    st = st._replace(flex=flex, dense_masks=flex.mask_mod is not None and flex.block_mask is None)
    t_pad, s_pad = _padded_lengths(st)
    # Padding rows and keys are masked (a block holding them is never full in a block mask).
    return st._replace(check_q_len=t_pad != st.q_len, check_kv_len=s_pad != st.kv_len)
