"""What the Mosaic GPU flash attention kernels share: the forward (`flash_mosaic`) and the
backward (`flash_mosaic_bwd`) both import it, so the two read forward -> backward without a
circle.

The static parameters a kernel bakes in (`Static`), the wgmma register layouts and their
interpret-mode stand-ins, the tensor-core matmuls, the per-tile logits and visibility mask, the
key-block range a block of queries visits, and the tiled shared-memory shapes.
"""

from __future__ import annotations

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common
from pallas_kernels.mod_tiles import over_tile, reads_arguments

LOG2E = math.log2(math.e)
CONSUMERS = 2  # compute warpgroups per program
HEAD_MULTIPLE = 64  # 128-byte swizzle of 16-bit elements


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernel computes with: the next multiple of 64."""
    return -(-head_dim // HEAD_MULTIPLE) * HEAD_MULTIPLE


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Static:
    """Everything the kernel bakes in (hashable: it keys the traced kernel)."""

    scale: float
    softcap: float | None
    right: int | None  # common.right_reach
    left: int | None  # common.left_reach
    check_q_len: bool
    check_kv_len: bool
    dense_masks: bool  # segments or a user mask: every tile needs its mask
    has_bias: bool
    has_mask: bool
    has_segments: bool
    groups: int
    block_q: int
    block_kv: int
    num_stages: int
    schedule_barrier: bool
    interpret: bool
    persistent: bool = False  # the forward: one program per SM loops over the tiles
    longest_first: bool = False  # the forward: causal query tiles that see the most keys first
    early_k_wait: bool = False  # the forward: wait for the next K tile while P V runs
    named_barrier: bool = False  # the forward's ping-pong turns on a hardware named barrier
    o_buffer: bool = False  # a persistent forward writes O to its own buffer (else Q's)
    softmax_overlap: bool = False  # the forward: Q K^T and the previous P V issued together
    head_parts: int = 1  # the dk/dv kernel: consumers share keys, each owns H / parts of dK, dV
    dkdv_stages: int = 0  # the dk/dv kernel's ring depth (0: num_stages)
    flex: object = None  # jattn.flex_attention: the user's mods (flash_triton.FlexSpec)
    flex_index_bound: int | None = None  # the mods' q_idx and kv_idx are below it
    flex_blocks: bool = False  # the kernel visits the blocks a BlockMask lists
    flex_steps: int = 1  # the backward's kernel steps per listed block (block mask / kernel tile)
    flex_programs: int = 1  # the backward's programs per block-mask row of lists
    fused_dq: bool = False  # the backward: dQ added up by the dk/dv kernel (no dq kernel)
    clean_hidden: bool = False  # masked tiles' non-finite K, V cleaned first (`clean_tile`)
    redo_hidden: bool = False  # the forward: no flag read; rows gone non-finite are redone clean


# --- interpret-mode stand-ins -----------------------------------------------------------------

WGMMA = plgpu.Layout.WGMMA
WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)  # [block_q] vectors: one value per row
WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)  # [block_kv] vectors: one value per column


def idiv(x: Array, n: int) -> Array:
    """x // n of an int32 index x >= 0 by a static n, int32 with jax_enable_x64 on too (lax
    takes a Python int as int64 there); n a literal, not a constant array."""
    return lax.div(x, np.int32(n))


def irem(x: Array, n: int) -> Array:
    """x % n of an int32 index x >= 0 by a static n (as `idiv`)."""
    return lax.rem(x, np.int32(n))


def layout_cast(st: Static, x: Array, layout) -> Array:
    return x if st.interpret else plgpu.layout_cast(x, layout)


def tile_iota(st: Static, shape, dim: int) -> Array:
    return layout_cast(st, lax.broadcasted_iota(jnp.int32, shape, dim), WGMMA)


def load_vector(st: Static, ref, layout) -> Array:
    """A 1-D shared-memory vector into registers, in the layout it will broadcast from."""
    if st.interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=layout)


def load_tile(st: Static, ref) -> Array:
    """A 2-D tile of shared memory (tiled, swizzled) into registers in the wgmma layout."""
    if st.interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=WGMMA)


def _parts(x) -> tuple:
    """A matmul operand given as one part of K or a sequence of parts: a tuple of parts."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def mma_accumulate(st: Static, acc: Array, lhs, rhs_ref, while_running=None) -> Array:
    """acc + lhs @ rhs on the tensor cores (acc float32 [M, N], lhs [M, K] in registers, rhs
    [K, N] in shared memory; or sequences of such, parts of K: the sum of the parts' products).
    while_running(): what to do between issuing the matmul and waiting for its result."""
    lhs_parts = _parts(lhs)
    rhs_refs = _parts(rhs_ref)
    if st.interpret:
        if while_running is not None:
            while_running()
        return acc + sum(
            jnp.dot(a, b[...], preferred_element_type=jnp.float32)
            for a, b in zip(lhs_parts, rhs_refs, strict=True)
        )

    def accumulate(acc_ref):
        for a, b in zip(lhs_parts, rhs_refs, strict=True):
            plgpu.wgmma(acc_ref, a, b)
        if while_running is not None:
            while_running()

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def mma_transposed(st: Static, lhs_ref, rhs_ref, while_running=None) -> Array:
    """lhs @ rhs^T into a fresh float32 accumulator (both [rows, K] in shared memory; or
    sequences of such refs, parts of K: the sum of the parts' products).
    while_running(): what to do between issuing the matmul and waiting for its result."""
    lhs_refs = _parts(lhs_ref)
    rhs_refs = _parts(rhs_ref)
    if st.interpret:  # the interpreter's wgmma takes no transposed operand
        if while_running is not None:
            while_running()
        return sum(
            lax.dot_general(
                a[...], b[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            for a, b in zip(lhs_refs, rhs_refs, strict=True)
        )

    def product(acc_ref):
        _issue_transposed(acc_ref, lhs_refs, rhs_refs)
        if while_running is not None:
            while_running()
        return acc_ref[...]

    return pl.run_scoped(product, _transposed_acc(lhs_refs, rhs_refs))


def _issue_transposed(acc_ref, lhs, rhs) -> None:
    """Issue acc += lhs @ rhs^T over the parts of K (no wait)."""
    for a, b in zip(_parts(lhs), _parts(rhs), strict=True):
        plgpu.wgmma(acc_ref, a, b.transpose((1, 0)))


def _transposed_acc(lhs, rhs):
    """The float32 accumulator [rows of lhs, rows of rhs] of lhs @ rhs^T."""
    return plgpu.ACC((_parts(lhs)[0].shape[0], _parts(rhs)[0].shape[0]), jnp.float32)


def mma_transposed_both(st: Static, first, second) -> tuple[Array, Array]:
    """mma_transposed of two (lhs_ref, rhs_ref) pairs into fresh float32 accumulators, both
    issued before either is waited for: one wait, not two."""
    if st.interpret:
        return mma_transposed(st, *first), mma_transposed(st, *second)

    def products(first_ref, second_ref):
        _issue_transposed(first_ref, *first)
        _issue_transposed(second_ref, *second)
        return first_ref[...], second_ref[...]

    return pl.run_scoped(products, _transposed_acc(*first), _transposed_acc(*second))


def mma_lhs_transposed(st: Static, lhs_t_ref, rhs_ref) -> Array:
    """lhs_t^T @ rhs into a fresh float32 accumulator: lhs_t [K, M] and rhs [K, N] both in
    shared memory (the first operand read transposed, as wgmma reads 16-bit operands); or
    sequences of such refs, parts of K: the sum of the parts' products."""
    lhs_refs = _parts(lhs_t_ref)
    rhs_refs = _parts(rhs_ref)
    if st.interpret:
        return sum(
            lax.dot_general(
                a[...], b[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            for a, b in zip(lhs_refs, rhs_refs, strict=True)
        )

    def product(acc_ref):
        for a, b in zip(lhs_refs, rhs_refs, strict=True):
            plgpu.wgmma(acc_ref, a.transpose((1, 0)), b)
        return acc_ref[...]

    shape = (lhs_refs[0].shape[1], rhs_refs[0].shape[1])
    return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


# The hardware's named barriers 0-3 are Mosaic GPU's (0 for the whole block, 1 + w for
# warpgroup w's own): the kernels' start after them.
TURN_BARRIER = 4
THREADS_PER_WARPGROUP = 128


def named_barrier_sync(barrier_id: int, threads: int) -> None:
    """`bar.sync barrier_id, threads`: wait until `threads` threads (a multiple of 32) arrived
    at the named barrier, this warpgroup's included. GPU only (the interpreter has no PTX)."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    @plgpu.inline_mgpu()
    def sync(_):
        llvm.inline_asm(
            ir.Type.parse("!llvm.void"),
            [],
            f"bar.sync {barrier_id}, {threads};",
            "",
            has_side_effects=True,
        )

    sync()


def tile_logits(st: Static, qk: Array, bias: Array | None) -> tuple[Array, Array | None]:
    """(base-2 logits, scale * q.k when the soft cap's gradient needs it, else None) of a tile."""
    if st.softcap is None:  # one multiply per element: scale and the base-2 change together
        logits = qk * (st.scale * LOG2E)
        if bias is not None:
            logits = logits + bias * LOG2E
        return logits, None
    scores = qk * st.scale
    logits = common.capped_logits(scores, st.softcap)
    if bias is not None:
        logits = logits + bias
    return logits * LOG2E, scores


# Whether the forward folds the scale into exp2's argument where it can (`folded_scale`; a
# switch for the A/B in benchmarks/dev/fold_scale_ab.py).
FOLD_SCALE = True


def folded_scale(st: Static) -> float | None:
    """scale * log2(e) where the forward may take its row max on q.k itself and fold the scale
    into exp2's argument (`online_softmax` in flash_mosaic): no soft cap, bias or score_mod
    between q.k and the logits, and scale > 0 (the max of q.k is then the max of the logits;
    at scale 0, -inf * 0 would be NaN). Else None."""
    score_mod = st.flex is not None and st.flex.score_mod is not None
    if not FOLD_SCALE or st.softcap is not None or st.has_bias or score_mod or not st.scale > 0:
        return None
    return st.scale * LOG2E


def segments_read(st: Static, masked: bool) -> bool:
    """Whether a tile reads the segment channels' vectors: masked tiles of segment ids; under
    flex, tiles whose mods read the per-row and per-key values put there (`FlexSpec.vectors`).
    Tiles that do not must not load them (see `flex_indices`)."""
    if not st.has_segments:
        return False
    if st.flex is None:
        return masked
    return st.flex.vectors and _mods_read(st.flex, masked, (4, 5))


def flex_reads_indices(flex, masked: bool) -> bool:
    """Whether the mods a tile runs read q_idx or kv_idx."""
    return flex is not None and _mods_read(flex, masked, (2, 3))


def _mods_read(flex, masked: bool, arguments) -> bool:
    """Whether the mods a tile runs (the score_mod in every tile, the mask_mod in masked ones)
    read their arguments at positions `arguments` after the score: mod(*(score), b, h, q_idx,
    kv_idx, *(the q and kv vectors of `FlexSpec.vectors`))."""
    mods = [(flex.score_mod, 1)] + ([(flex.mask_mod, 0)] if masked else [])
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    for mod, lead in mods:
        if mod is None:
            continue
        args = [jax.ShapeDtypeStruct((), jnp.float32)] * lead + [scalar] * (4 + 2 * flex.vectors)
        positions = [lead + i for i in arguments if lead + i < len(args)]
        if reads_arguments(mod, args, positions):
            return True
    return False


def flex_indices(
    st: Static, shape, q_first, k_first, bounds, *, masked: bool, transposed: bool = False
) -> tuple:
    """q_idx [bq], kv_idx [bk] int32 of a tile for the user's mods: vectors in the layouts they
    broadcast from (the tile's rows: WGMMA_ROW, its columns: WGMMA_COL; keys down in the dk/dv
    kernel with transposed=True), clamped into [0, T) and [0, S) (positions past them are
    masked anyway). Unmasked tiles skip the clamp of the vector along their columns: an
    operation on that vector costs half an instruction per tile element, as it is spread over
    the threads that hold its columns, and the clamp's min and max were one of ALiBi's five
    extra per element in the H200's SASS. Where no mod the tile runs reads them
    (`flex_reads_indices`), shapes alone: unused index vectors left in a kernel leave Mosaic
    GPU's layout search (JAX 0.11) without a solution (seen on the H200: a block mask's full
    tiles under a mask_mod alone, a mask_mod that reads only closed-over ids)."""
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    if not flex_reads_indices(st.flex, masked):
        vector = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)  # noqa: E731
        return vector(shape[q_axis]), vector(shape[k_axis])
    q_idx = q_first + vector_iota(st, shape[q_axis], q_axis)
    k_idx = k_first + vector_iota(st, shape[k_axis], k_axis)
    # The vector along the tile's columns (keys; queries with transposed=True) is in range in
    # unmasked tiles (`common.unmasked_key_blocks`, `unmasked_query_blocks`); the one along its
    # rows is cheap to clamp, and the flex forward computes padded query rows unmasked.
    clamp_q, clamp_k = (masked, True) if transposed else (True, masked)
    q_idx = jnp.clip(q_idx, 0, bounds[1] - 1) if clamp_q else q_idx
    k_idx = jnp.clip(k_idx, 0, bounds[2] - 1) if clamp_k else k_idx
    return q_idx, k_idx


def vector_iota(st: Static, n: int, axis: int) -> Array:
    """0, 1, ..., n - 1 along a tile's axis 0 (WGMMA_ROW) or 1 (WGMMA_COL)."""
    return layout_cast(st, lax.iota(jnp.int32, n), WGMMA_ROW if axis == 0 else WGMMA_COL)


def flex_scores(
    st: Static, scores: Array, b, h, q_idx, k_idx, transposed=False, vectors=(), *,
    score_scale=None, out_scale=None,
) -> Array:  # fmt: skip
    """out_scale * the user's score_mod(score, b, h, q_idx, kv_idx) over a tile of
    score = score_scale * `scores` (with the query-row and key-column values of
    `FlexSpec.vectors` after kv_idx); the two factors fold into the mod's own scalars where its
    arithmetic allows (`mod_tiles._Linear`). None: 1."""
    one = lambda s, q, k, *v: st.flex.score_mod(s, b, h, q, k, *v)  # noqa: E731
    tile = over_tile(
        one, q_idx, k_idx, scores, vectors=vectors, transposed=transposed,
        index_bound=st.flex_index_bound, tile_scales=(score_scale,), out_scale=out_scale,
    )  # fmt: skip
    return tile.astype(jnp.float32)


def flex_forward_logits(st: Static, qk: Array, b, h, q_idx, k_idx, vectors=()) -> Array:
    """The forward's base-2 logits of a tile under the user's score_mod: log2(e) *
    score_mod(scale * q.k, ...), both factors folded where the mod allows."""
    return flex_scores(
        st, qk, b, h, q_idx, k_idx, vectors=vectors, score_scale=st.scale, out_scale=LOG2E
    )


def flex_logits(
    st: Static, qk: Array, b, h, q_idx, k_idx, transposed=False, vectors=()
) -> tuple[Array, Array | None]:
    """The backward's (base-2 logits, d logit / d score) of a tile under the user's score_mod,
    score = scale * q.k; the derivative from JAX (jax.jvp of the elementwise tile function with
    unit tangents), None where it is 1: without a score_mod, and where the score_mod only adds
    to the score (ALiBi, a relative bias: its jvp hands the score's tangent back unchanged, seen
    in a trace of it), so the backward skips a multiply per element."""
    if st.flex.score_mod is None:
        return qk * (st.scale * LOG2E), None

    def tile(s):
        return flex_scores(st, s, b, h, q_idx, k_idx, transposed, vectors)

    # traced apart (only qk's shape counts): nothing of it enters the kernel
    tangent = jax.make_jaxpr(lambda s, t: jax.jvp(tile, (s,), (t,))[1])(qk, qk).jaxpr
    if tangent.outvars[0] is tangent.invars[1]:  # d score_mod / d score == 1
        logits = flex_scores(
            st, qk, b, h, q_idx, k_idx, transposed, vectors, score_scale=st.scale,
            out_scale=LOG2E,
        )  # fmt: skip
        return logits, None
    scores = qk * st.scale
    unit = layout_cast(st, jnp.ones(scores.shape, jnp.float32), WGMMA)
    logits, slope = jax.jvp(tile, (scores,), (unit,))
    return logits * LOG2E, slope


def backward_tile_logits(
    st: Static,
    qk: Array,
    bias,
    *,
    b,
    h,
    q_first,
    k_first,
    bounds,
    masked: bool,
    transposed=False,
    vectors=(),
):
    """The backward's tile (keys down with transposed=True, in the dk/dv kernel): (base-2
    logits, scale * q.k where the soft cap's gradient needs it, d score_mod / d score, the
    mask_mod's visibility where the tile is masked), each None where it does not apply."""
    if st.flex is None:
        return *tile_logits(st, qk, bias), None, None
    q_idx, k_idx = flex_indices(
        st, qk.shape, q_first, k_first, bounds, masked=masked, transposed=transposed
    )
    logits, slope = flex_logits(st, qk, b, h, q_idx, k_idx, transposed, vectors)
    user_visible = None
    if masked and st.flex.mask_mod is not None:
        user_visible = flex_visible(st, b, h, q_idx, k_idx, transposed, vectors)
    return logits, None, slope, user_visible


def flex_unlowered(flex) -> set[str] | None:
    """Primitives of the user's mods, traced as the kernels trace them (`flex_logits`,
    `flex_visible` over a [64, 64] tile from index vectors), that Mosaic GPU's lowering has no
    rule for (warpgroup code over lane arrays): empty when the mods should lower, None when this
    JAX's rule table cannot be read (a private table: treat as unknown). `log1p` and
    `custom_jvp_call` (jax.nn.relu, softplus) are two (seen in the CUDA lowering); `exp`, `log`,
    `tanh`, integer `//` and `%`, comparisons and `where` lower."""
    try:
        from jax._src import core
        from jax._src.pallas.mosaic_gpu import lowering

        lane, warpgroup = lowering.mgpu.LoweringSemantics.Lane, lowering.gpu_core.PrimitiveSemantics
        rules = lowering.mosaic_lowering_rules[(lane, warpgroup.Warpgroup)]
    except (ImportError, AttributeError, KeyError):
        return None
    # What the tile helpers read of a Static; interpret: no layout casts outside a kernel.
    probe = types.SimpleNamespace(flex=flex, scale=1.0, interpret=True, flex_index_bound=64)

    def tile(qk, q_idx, k_idx, b, h):
        vectors = (q_idx, k_idx) if flex.vectors else ()  # int32 vectors, as the channels
        results = list(flex_logits(probe, qk, b, h, q_idx, k_idx, vectors=vectors))
        if flex.mask_mod is not None:
            results.append(flex_visible(probe, b, h, q_idx, k_idx, vectors=vectors))
        return [r for r in results if r is not None]

    index = jax.ShapeDtypeStruct((64,), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    qk = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    jaxpr = jax.make_jaxpr(tile)(qk, index, index, scalar, scalar).jaxpr

    def missing(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive not in rules:  # calls too: custom_jvp_call (jax.nn.relu) has none
                yield eqn.primitive.name
            for sub in core.jaxprs_in_params(eqn.params):
                yield from missing(sub)

    return set(missing(jaxpr))


def flex_visible(st: Static, b, h, q_idx, k_idx, transposed=False, vectors=()) -> Array:
    """The user's mask_mod(b, h, q_idx, kv_idx) over a tile: [bq, bk] bool ([bk, bq] with
    transposed=True)."""
    one = lambda q, k, *v: st.flex.mask_mod(b, h, q, k, *v)  # noqa: E731
    tile = over_tile(
        one, q_idx, k_idx, vectors=vectors, transposed=transposed,
        index_bound=st.flex_index_bound,
    )  # fmt: skip
    return tile.astype(bool)


def flex_vectors(st: Static, q_seg, kv_seg) -> tuple:
    """What a flex tile's mods take after kv_idx: the segment channels' vectors where
    `FlexSpec.vectors` put the mods' per-row and per-column values there, else nothing."""
    return (q_seg, kv_seg) if st.flex is not None and st.flex.vectors else ()


def hide_invisible(
    st: Static,
    logits,
    *,
    q_first,
    k_first,
    bounds,
    q_seg,
    kv_seg,
    mask,
    transposed=False,
    user_visible=None,
):
    """-inf where a query does not see a key. logits: queries down, keys across (or keys down
    with transposed=True, in the dk/dv kernel); q_seg, kv_seg: 1-D vectors in the layout of
    their axis. The position grids are built here, per masked tile, not held across the loop
    (two int32 tiles would cost a consumer 128 registers)."""
    if st.flex is not None:  # the segment channels carry the mods' vectors (`flex_vectors`)
        q_seg = kv_seg = None
    shape = logits.shape
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    if q_seg is not None:
        q_seg = lax.broadcast_in_dim(q_seg, shape, [q_axis])
        kv_seg = lax.broadcast_in_dim(kv_seg, shape, [k_axis])
    visible = common.tile_visibility(
        q_first + tile_iota(st, shape, q_axis),
        k_first + tile_iota(st, shape, k_axis),
        q_offset=bounds[0],
        q_len=bounds[1],
        kv_len=bounds[2],
        right=st.right,
        left=st.left,
        check_q_len=st.check_q_len,
        check_kv_len=st.check_kv_len,
        q_seg=q_seg,
        kv_seg=kv_seg,
        broadcast=False,
    )
    if mask is not None:
        visible = mask != 0 if visible is None else visible & (mask != 0)
    if user_visible is not None:  # a flex mask_mod's tile
        visible = user_visible if visible is None else visible & user_visible
    return logits if visible is None else jnp.where(visible, logits, -jnp.inf)


def pair_window(ref, batch, head, rows, cols):
    """The [rows, cols] window of a [B', N', R, C] operand that broadcasts over B' or N' == 1."""
    return ref.at[batch if ref.shape[0] > 1 else 0, head if ref.shape[1] > 1 else 0, rows, cols]


def key_blocks(st: Static, bounds, q_first, rows: int):
    """(lo, inner_lo, inner_hi, hi) of the key blocks that queries [q_first, +rows) visit."""
    q_offset, q_len, kv_len = bounds
    reach = dict(right=st.right, left=st.left)
    q_stop = jnp.minimum(q_first + rows, q_len)
    lo, hi = common.key_block_range(
        q_first, q_stop, q_offset=q_offset, kv_len=kv_len, block_k=st.block_kv, **reach
    )
    inner_lo, inner_hi = common.unmasked_key_blocks(
        lo,
        hi,
        q_first,
        q_offset=q_offset,
        q_len=q_len,
        kv_len=kv_len,
        block_q=rows,
        block_k=st.block_kv,
        check_q_len=st.check_q_len,
        check_kv_len=st.check_kv_len,
        **reach,
    )
    return lo, inner_lo, inner_hi, hi


def bias_dtype(dtype):
    """The dtype a bias streams through shared memory in: its own, float32 for float64 (under
    jax_enable_x64; the kernels add it in float32, and 8 bytes a logit overflow the buffers
    that `pair_itemsize` sized at 4)."""
    return jnp.float32 if dtype == jnp.float64 else dtype


CLEAN_HIDDEN = True  # False: masked tiles keep non-finite keys (timing A/B only; issue 19)


def hides_keys(st: Static) -> bool:
    """Whether a tile can hold keys hidden from some of its queries by causal, a window,
    segment ids, a mask, a flex mask or query lengths (rows past them see no key; key lengths:
    the caller zeroes keys past them)."""
    return CLEAN_HIDDEN and (
        st.right is not None
        or st.left is not None
        or st.dense_masks
        or st.flex_blocks
        or st.check_q_len
    )


NONFINITE = 3  # the column of a kernel's bounds [B, 4] that `flag_nonfinite` sets


def flag_nonfinite(st: Static, bounds: Array, *arrays: Array) -> Array:
    """bounds [B, 4] int32 with column NONFINITE set to 1 in the batch rows where one of
    `arrays` ([B, ...]: the forward's V; the backward's K and V) holds a NaN or an inf. Only
    those rows' tiles are cleaned (`cleaned_steps`): finite inputs, the common case, cost one
    read of the arrays in XLA instead of a cleaning pass per masked tile in the kernel (which
    took the forward with segment ids from 3.7 to 10.3 ms at T = 16k, H = 128; stop 33).
    The forward needs V alone: a hidden key's non-finite logit is selected away as -inf; only
    0 * V leaks. (A visible key whose K holds an inf can give its rows a logit of -inf, as if
    hidden, where the reference gives NaN: in every tile not cleaned, which is every tile of a
    row whose V is finite; the unmasked tiles did so before stop 32's cleaning too.)
    A row flagged already stays flagged: the backward adds K's flag to the one the forward
    set from V (`flash_mosaic_bwd.backward(values_flagged=True)`), and reads V no more. Each
    read of an array costs the call about 25 us on an H200 at 16k tokens x 2048 (64 MB;
    stop 36), which is what a short causal forward trails tokamax by. A check of each masked
    tile in the kernel instead was no cheaper (`clean_landed_tile`; stop 37)."""
    if not st.clean_hidden:
        return bounds
    bad = bounds[:, NONFINITE] != 0
    for x in arrays:
        bad = bad | ~jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    return bounds.at[:, NONFINITE].set(bad.astype(bounds.dtype))


def cleaned_steps(st: Static, bounds, nonfinite, program_first, rows: int, lo, hi, n_partial=None):
    """step -> (traced) whether the tile of `step` (in [lo, hi)) can hide a key from a query of
    the program's rows [program_first, +rows) in a batch row whose inputs are not all finite
    (`nonfinite`: its bounds' NONFINITE column): the steps whose K and V the producer cleans
    (`clean_tile`). n_partial: a flex block list's partial blocks, which come first."""
    if st.flex_blocks:
        inner = (n_partial, hi)
    elif st.dense_masks:
        inner = (hi, hi)
    else:
        _, inner_lo, inner_hi, _ = key_blocks(st, bounds, program_first, rows)
        inner = common.clip_inner(lo, hi, inner_lo, inner_hi)
    dirty = nonfinite != 0
    return lambda step: dirty & ((step < inner[0]) | (step >= inner[1]))


def clean_landed_tile(arrived, cleaned, k_ref, v_ref, *, poison_keys: bool) -> None:
    """The producer's side of a cleaned step: wait for the tile's copies (on `arrived`), clean
    its K and V, make them visible to the consumers' wgmma and release them (on `cleaned`).
    (Checking each masked tile here instead of reading V in XLA, `flag_nonfinite`, and cleaning
    only the tiles that hold a NaN or an inf, timed no faster: it stalls the producer's ring;
    stop 37, `benchmarks/results/check_in_kernel_ab_h200.json`.)"""
    plgpu.barrier_wait(arrived)
    clean_tile(k_ref, v_ref, poison_keys=poison_keys)
    plgpu.commit_smem()
    plgpu.barrier_arrive(cleaned)


def _pieces(shape: tuple[int, int]):
    """The [64, 64] pieces (slices) of a shared-memory tile [rows, cols] that the producer
    warpgroup reads at a time (few registers there)."""
    rows, cols = shape
    for r in range(0, rows, 64):
        for c in range(0, cols, 64):
            yield pl.ds(r, min(64, rows - r)), pl.ds(c, min(64, cols - c))


def _piece_view(ref, piece):
    """A piece of a tile (`_pieces`), as a ref to load and store whole. Mosaic GPU loads a
    swizzled tile of 64 rows in the wgmma layout; a tile of fewer rows (the dq kernel's 32 keys,
    `DQ_HALF_KEYS`) transposed, which tiles its 64 columns (elementwise work minds no order)."""
    view = ref.at[piece]
    if piece[0].size % 64 == 0 or common.interpret_mode():
        return view, None
    return view.transpose((1, 0)), plgpu.Layout.WGMMA_TRANSPOSED


def clean_tile(k_ref, v_ref, *, poison_keys: bool) -> None:
    """Makes a shared-memory K, V tile [bk, H] safe for queries that some of its keys are hidden
    from: P V and dS K multiply a hidden key by an exact 0, and 0 * NaN = NaN. Non-finite
    elements of V become 0. poison_keys (the forward): K becomes NaN wherever K or V is not
    finite, so that every row that sees such a key gets a NaN logit and so NaN output and lse,
    as the reference's `masking.poison_rows` does, while the rows it is hidden from select
    -inf; else (the dq kernel, whose rows that see a bad key already have a NaN lse) non-finite
    elements of K become 0. Run by the producer warpgroup between a tile's copy and its
    consumers, on [64, 64] pieces (few registers there), or by a consumer on its own tile in
    a `MosaicConfig.redo_hidden` redo; |x| < inf is the finiteness test (Mosaic GPU lowers no
    is_finite)."""
    for piece in _pieces(k_ref.shape):
        (k_view, layout), (v_view, _) = _piece_view(k_ref, piece), _piece_view(v_ref, piece)
        k, v = (plgpu.load(x, (), layout=layout) if layout else x[...] for x in (k_view, v_view))
        v_ok = jnp.abs(v) < jnp.inf
        k_ok = jnp.abs(k) < jnp.inf
        v_view[...] = jnp.where(v_ok, v, jnp.zeros_like(v))
        if poison_keys:
            k_view[...] = jnp.where(k_ok & v_ok, k, jnp.full_like(k, jnp.nan))
        else:
            k_view[...] = jnp.where(k_ok, k, jnp.zeros_like(k))


def nonfinite_rows(acc: Array) -> Array:
    """[rows] float32: 1 where a row of acc [rows, H] holds a NaN or an inf (or its finite
    values sum past float32's range, which only costs a redo), else 0. One add per element."""
    row_sums = acc.sum(axis=1)  # float32 constants: no float64 under jax_enable_x64
    return jnp.where(jnp.abs(row_sums) < jnp.inf, jnp.zeros_like(row_sums), jnp.ones_like(row_sums))


def tiled(shape, dtype, max_swizzle: int = 128):
    """Shared memory in the tiled, swizzled form wgmma operands and register tiles use: rows of
    8, the widest swizzle (128, 64 or 32 bytes, at most max_swizzle) that one row of the last
    axis fills. (Mosaic GPU's wgmma takes both operands at one swizzle, and K in multiples of
    its width: a K of 32 16-bit elements needs 64 bytes.)"""
    itemsize = jnp.dtype(dtype).itemsize
    row = max(32, min(shape[-1] * itemsize, max_swizzle))
    swizzle = max(s for s in (32, 64, 128) if s <= row)
    elements = swizzle // itemsize
    return plgpu.SMEM(
        shape,
        dtype,
        transforms=(plgpu.TilingTransform((8, elements)), plgpu.SwizzleTransform(swizzle)),
    )


def interpret_kwargs(st: Static, zeroed: bool = False) -> dict:
    """The interpret-mode argument of a kernel launch (none on a GPU); zeroed: its outputs
    start as zeros (else NaN, which shows an output element no program wrote)."""
    if not st.interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret import params as interpret_params

    memory = "zero" if zeroed else "nan"
    return {"interpret": interpret_params.InterpretGPUParams(uninitialized_memory=memory)}
