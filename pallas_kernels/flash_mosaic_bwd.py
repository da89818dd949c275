"""Flash attention backward for Hopper on Mosaic GPU: a dq kernel and a dk/dv kernel.

FlashAttention-2's backward, recomputing each tile's probabilities from the forward's lse:
- dq: a program per (head, 2 * block_q query rows, batch); a producer warpgroup streams K and V
  tiles as in the forward, two consumers each own block_q rows:
  S = Q K^T, P = exp2(S' - lse'), dP = dO V^T, dS = P (dP - delta), dQ += dS K;
- dk/dv: a program per (query head, 2 * block_kv key rows, batch); the producer streams Q, dO,
  lse and delta tiles of the query blocks that can see those keys; two consumers each own
  block_kv key rows and work on transposed tiles, so that no register tile is transposed:
  S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
Above H = 128 the dk/dv kernel's two consumers share one block of keys and each accumulates
half of dK's and dV's columns; each computes S^T and dP^T for half of a step's queries and they
trade their halves of P^T and dS^T through shared memory (`QUERY_SPLIT`). Causal dq programs
run longest first (`MosaicConfig.longest_first`).
delta = rowsum(dO * O) - d_lse is computed before (XLA fuses it). dk and dv are written per
query head and summed over the G heads of a group afterwards, so every output has one writer:
no atomics, the same bits every run.

With `Static.fused_dq` (`MosaicConfig.bwd_fused_dq`) only the dk/dv kernel runs, as in
FlashAttention-2/3's backward: each consumer also writes dS^T to shared memory, the two
consumers' dS^T meet there, and each computes one column chunk of dQ = dS @ K for the step's
queries over both consumers' keys (FlashAttention-3's split; a wgmma with the transposed dS as
its first operand), which a TMA reduce-add store adds into a float32 dQ in global memory (a
`jax.new_ref`, zeroed first). That drops the dq kernel's second Q K^T and dO V^T: 5 matmuls
per tile pair, not 7; the float32 sums of dQ then depend on the order of the adds. The
interpreter has no TMA reductions: there each consumer adds into a zeroed output of its own
(programs run one after another), and the consumers' parts are summed after.

A NaN or inf in a key the mask hides must not reach dQ through dS = 0 * NaN or dS K: the dq
kernel's producer cleans the masked tiles of batch rows flagged in XLA (`flag_nonfinite`), or,
with `Static.redo_hidden` (`MosaicConfig.bwd_redo_hidden`, the default up to H = 128), the tiles
run uncleaned and a consumer whose dQ rows went non-finite computes them again, loading and
cleaning its own tiles (no flag read). The dk/dv kernel cleans its keys only for fused_dq's
dS K: otherwise a key's non-finite K or V reaches only its own dK and dV rows there.

Everything the forward applies per tile applies here too (`flash_mosaic` has the details); a
bias or mask enters the dk/dv kernel transposed ([S, T], one copy made in XLA). dbias is not
computed here: when the bias is differentiated the caller uses the Triton backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common
from pallas_kernels.mosaic_common import (
    CONSUMERS,
    LOG2E,
    NONFINITE,
    THREADS_PER_WARPGROUP,
    TURN_BARRIER,
    WGMMA,
    WGMMA_COL,
    WGMMA_ROW,
    Static,
    backward_tile_logits,
    bias_dtype,
    clean_landed_tile,
    clean_tile,
    cleaned_steps,
    flag_nonfinite,
    flex_vectors,
    hide_invisible,
    idiv,
    interpret_kwargs,
    irem,
    key_blocks,
    layout_cast,
    load_tile,
    load_vector,
    mma_accumulate,
    mma_lhs_transposed,
    mma_transposed,
    mma_transposed_both,
    named_barrier_sync,
    nonfinite_rows,
    padded_head_dim,
    pair_window,
    segments_read,
    tiled,
)


def head_parts(head_dim: int) -> int:
    """Column parts of dK and dV in the dk/dv kernel: 2 above H = 128 (dK and dV of 64 keys at
    H = 256 would take a consumer 256 registers per thread; a half, 128), else 1."""
    return 2 if padded_head_dim(head_dim) > 128 else 1


def backward_head_dim(head_dim: int, parts: int) -> int:
    """The head dim the backward computes with: `parts` parts, each a multiple of 64."""
    return parts * padded_head_dim(-(-head_dim // parts))


def keys_per_program(st: Static) -> int:
    """Keys of one dk/dv program: a block of block_kv per consumer, or one block both consumers
    share when dK and dV are split by columns (st.head_parts > 1)."""
    return st.block_kv if st.head_parts > 1 else CONSUMERS * st.block_kv


def padding_tiles(st: Static) -> tuple[int, int]:
    """(T, S) multiples the backward pads to: both kernels tile both axes by 2 * the larger
    block, and under a flex block mask by whole block-mask blocks too (every listed block in
    range)."""
    tile = CONSUMERS * max(st.block_q, st.block_kv)
    if not st.flex_blocks:
        return tile, tile
    mask_q, mask_kv = st.flex.block_mask
    return math.lcm(tile, mask_q), math.lcm(tile, mask_kv)


DQ_CHUNK = 64  # fused_dq: columns of dQ per wgmma (32 float32 registers per thread)
DS_BARRIER = TURN_BARRIER  # the consumers' dS^T (fused_dq) or halves meet at this named barrier
# fused_dq stages left out, for timing only (`benchmarks/dev/fused_dq_parts.sh`; wrong dQ):
# "store" (the dQ tile's shared-memory store and TMA reduce-add), "mma" (the dS @ K wgmma too),
# "tma" (the TMA reduce-add alone: the store, fence and waits stay).
FUSED_DQ_OMIT = frozenset()
# fused_dq with one head part: the consumers' dS^T meet and each computes one dQ chunk over both
# consumers' keys (`add_dq`), where the part is at most this wide; wider (and with 0), each adds
# its own keys' dS @ K. Stop 33's A/B (`benchmarks/dev/fused_dq_ab.py`, forward+backward, ms,
# meeting / own): H = 64 4.96 / 5.22 (4k) and 18.61 / 19.61 (16k) non-causal, 9.96 / 10.43 causal
# 16k; H = 128 4.18 / 3.92 and 16.67 / 15.20 non-causal, 9.31 / 9.35 causal 16k.
COOPERATIVE_DQ = 64


# Above H = 128 (st.head_parts > 1) the dk/dv kernel's consumers share one block of keys. With
# QUERY_SPLIT, as FlashAttention-3's backward at H = 256 splits its S tile over two warpgroups,
# consumer w computes S^T and dP^T for half w of each step's queries (over the whole head dim),
# writes its halves of P^T and dS^T to shared memory, and once both have, accumulates its column
# part of dV and dK over both halves (its own from registers, the other's loaded from shared
# memory): 4 matmuls per tile pair, where both consumers computing all of S^T and dP^T made 6.
# Not with a bias or mask tile (read whole, transposed), flex mods or fused_dq; stop 41
# (benchmarks/NOTES.md).
QUERY_SPLIT = True
# The dk/dv kernel's shared-memory swizzle in bytes; None: 64 with query halves (a K of 32
# 16-bit queries needs it), else 128. A number forces it (A/Bs: what 64 costs without halves).
DKDV_SWIZZLE = None


# The dq kernel keeps Q and dO of both consumers in shared memory (128 KiB at H = 256), so there
# its ring holds one stage of 64-key K and V tiles: the next tile's loads wait until both
# consumers are done with this one. With DQ_HALF_KEYS such a ring runs as two stages of 32 keys
# (the same bytes), whose loads run under the other stage's matmuls. dQ += dS K then has a K of
# 32 keys, so all of the kernel's operands take a 64-byte swizzle. Not with a bias or mask tile
# or flex mods (their tiles and block lists are in 64-key steps).
DQ_HALF_KEYS = True


def _base2_lse(lse: Array) -> Array:
    """lse * log2(e), or 0 where lse is -inf (a row that sees no key: its p is 0 either way):
    what both kernels read, so that exp2(S' - lse') needs no test there. Done in XLA, once per
    row: in the dk/dv kernel each thread holds 32 queries' lse for only 2 keys, and the multiply
    and the test there cost 1.5 of 10 instructions per score element (Nsight Compute's SASS at
    H = 64; 1-11% of H = 64's forward+backward, stop 43)."""
    return jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E)


# Padded head dims at which the dq kernel issues S = Q K^T and dP = dO V^T together and waits
# once for both (one more float32 tile in registers while both are in flight). Timed on the H200
# in one process (benchmarks/NOTES.md; forward+backward, off -> on): at H = 128 (stop 44) causal
# 1.2-2.5% faster (4k 2.207 -> 2.181 ms, 8k 4.191 -> 4.110, 16k 7.986 -> 7.812 and 8.023 ->
# 7.825), non-causal within 0.4%; at H = 256 (stop 45) 4k 4.535 -> 4.417 non-causal, 2.512 ->
# 2.508 causal, 16k 17.28 -> 17.31 non-causal, 9.089 -> 8.910 causal; at H = 64 0-5% slower.
# The dk/dv kernel's pairing (S^T with dP^T, dV with dK) was 37-49% slower at H = 64 (256 live
# registers a thread against 232) and 11% slower causal at H = 128, 16k, and was removed; so
# was its FlashAttention-3 overlap (S^T of the next step in flight while dS^T is computed:
# 2-31% slower in 6 of 8 cells at H = 64 and 128, stop 45).
PAIRED_DQ_HEAD_DIMS = (128, 256)


def _dq_static(st: Static, has_pairs: bool) -> Static:
    """The dq kernel's Static: st, or with DQ_HALF_KEYS two stages of half of st's keys."""
    one_stage = st.num_stages == 1 and st.block_kv == 64
    if DQ_HALF_KEYS and one_stage and not has_pairs and st.flex is None:
        return dataclasses.replace(st, block_kv=st.block_kv // 2, num_stages=2)
    return st


def _query_split(st: Static) -> bool:
    return (
        QUERY_SPLIT
        and st.head_parts > 1
        and st.block_q % (CONSUMERS * 32) == 0  # a half's K for dV: a multiple of 32
        and not (st.fused_dq or st.has_bias or st.has_mask or st.flex is not None)
    )


def _cooperative_dq(st: Static, part_width: int) -> bool:
    return st.fused_dq and st.head_parts == 1 and part_width <= COOPERATIVE_DQ


def _scalars(bounds_ref, batch):
    return bounds_ref[batch, 0], bounds_ref[batch, 1], bounds_ref[batch, 2]


def _produce(scratch, lo, hi, stages: int, copies, cleaned=None) -> None:
    """The producer warpgroup: for each step of [lo, hi), wait until the consumers released
    its ring slot, then issue copies(step, slot, barrier); finally observe the last releases.
    Where cleaned(step) (a traced bool; None: nowhere) the copies land on `arrived` instead,
    K and V are cleaned there (`clean_landed_tile`), and `cleaned` releases the consumers
    (`_await_tile`)."""
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(lo, hi)
    def _(step):
        slot = irem(step - lo, stages)

        @pl.when(step - lo >= stages)
        def _():
            plgpu.barrier_wait(scratch["consumed"].at[slot])

        if cleaned is None:
            copies(step, slot, scratch["produced"].at[slot])
            return
        dirty = cleaned(step)
        pl.when(~dirty)(lambda: copies(step, slot, scratch["produced"].at[slot]))

        @pl.when(dirty)
        def _():
            copies(step, slot, scratch["arrived"].at[slot])
            k, v = scratch["k"].at[slot], scratch["v"].at[slot]
            arrived, done = scratch["arrived"].at[slot], scratch["cleaned"].at[slot]
            clean_landed_tile(arrived, done, k, v, poison_keys=False)

    @pl.loop(jnp.maximum(lo, hi - stages), hi)
    def _(step):
        plgpu.barrier_wait(scratch["consumed"].at[irem(step - lo, stages)])


def _await_tile(scratch, step, slot, cleaned=None) -> None:
    """A consumer's wait for the ring slot of `step`: its copies, or its cleaning (`_produce`)."""
    if cleaned is None:
        plgpu.barrier_wait(scratch["produced"].at[slot])
        return
    dirty = cleaned(step)
    pl.when(dirty)(lambda: plgpu.barrier_wait(scratch["cleaned"].at[slot]))
    pl.when(~dirty)(lambda: plgpu.barrier_wait(scratch["produced"].at[slot]))


def _await_visit_list(st: Static, refs, scratch, batch, head, program):
    """A flex block mask (st.flex_blocks): copy this program's visit list ([n, n_partial, block
    ids, partial ones first], one row of a [B', N', blocks, L] operand; st.flex_programs programs
    share a row) to shared memory; every warpgroup waits for it. Returns (steps, partial steps):
    st.flex_steps kernel steps per listed block."""

    @pl.when(lax.axis_index("wg") == CONSUMERS)
    def _():
        lists = refs["visits"]
        row = idiv(program, st.flex_programs)
        source = pair_window(lists, batch, head, row, pl.ds(0, lists.shape[-1]))
        plgpu.copy_gmem_to_smem(source, scratch["visits"], scratch["visits_ready"])

    plgpu.barrier_wait(scratch["visits_ready"])
    return scratch["visits"][0] * st.flex_steps, scratch["visits"][1] * st.flex_steps


def _block_of(st: Static, scratch, step):
    """The kernel block of step `step`: itself, or under a flex block mask the listed block's
    sub-block (step // flex_steps-th entry, step % flex_steps-th part of it)."""
    if not st.flex_blocks:
        return step
    if st.flex_steps == 1:
        return scratch["visits"][2 + step]
    listed = scratch["visits"][2 + idiv(step, st.flex_steps)]
    return listed * st.flex_steps + irem(step, st.flex_steps)


# --- dq ----------------------------------------------------------------------------------------


def _dq_kernel(refs, scratch, *, st: Static):
    block_q, block_kv, stages = st.block_q, st.block_kv, st.num_stages
    head, q_tile = lax.axis_index("heads"), lax.axis_index("tiles")
    batch, wg = lax.axis_index("batch"), lax.axis_index("wg")
    if st.longest_first and st.right is not None and not st.flex_blocks:
        # causal: the query tiles that see the most keys start first, the short ones fill the
        # tail (the forward's `longest_first`; the dk/dv kernel's first key tiles are its
        # longest already)
        q_tile = refs["q"].shape[1] // (CONSUMERS * block_q) - 1 - q_tile
    bounds = _scalars(refs["bounds"], batch)
    program_first = q_tile * (CONSUMERS * block_q)
    program_rows = pl.ds(program_first, CONSUMERS * block_q)
    n_partial = None
    if st.flex_blocks:  # the listed key blocks: partial ones [0, n_partial), full ones after
        lo, (hi, n_partial) = 0, _await_visit_list(st, refs, scratch, batch, head, q_tile)
    else:
        lo, _, _, hi = key_blocks(st, bounds, program_first, CONSUMERS * block_q)
    cleaned = redo_cleaned = None
    if st.clean_hidden:  # the steps where a query of the program has a hidden key
        rows = CONSUMERS * block_q
        nonfinite = refs["bounds"][batch, NONFINITE]
        if not st.redo_hidden:
            cleaned = cleaned_steps(st, bounds, nonfinite, program_first, rows, lo, hi, n_partial)
        else:  # st.redo_hidden: none in the first pass; in a redo, as if the row were flagged
            redo_cleaned = cleaned_steps(st, bounds, 1, program_first, rows, lo, hi, n_partial)
    kv_head = idiv(head, st.groups)

    def copies(step, slot, barrier):
        keys = pl.ds(_block_of(st, scratch, step) * block_kv, block_kv)
        for name in ("k", "v"):
            plgpu.copy_gmem_to_smem(
                refs[name].at[batch, keys, kv_head], scratch[name].at[slot], barrier
            )
        for name in ("bias", "mask"):
            if name in refs:
                source = pair_window(refs[name], batch, head, program_rows, keys)
                plgpu.copy_gmem_to_smem(source, scratch[name].at[slot], barrier)
        if st.has_segments:
            source = refs["kv_seg"].at[batch, keys]
            plgpu.copy_gmem_to_smem(source, scratch["kv_seg"].at[slot], barrier)

    @pl.when(wg == CONSUMERS)
    def _producer():
        _produce(scratch, lo, hi, stages, copies, cleaned)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_first = program_first + wg * block_q
        rows = pl.ds(q_first, block_q)
        ready = scratch["rows_produced"].at[wg]
        for name in ("q", "d_out"):
            plgpu.copy_gmem_to_smem(refs[name].at[batch, rows, head], scratch[name].at[wg], ready)
        for name in ("lse", "delta"):
            plgpu.copy_gmem_to_smem(refs[name].at[batch, head, rows], scratch[name].at[wg], ready)
        if st.has_segments:
            plgpu.copy_gmem_to_smem(refs["q_seg"].at[batch, rows], scratch["q_seg"].at[wg], ready)
        plgpu.barrier_wait(ready)

        shape = (block_q, block_kv)
        lse = load_vector(st, scratch["lse"].at[wg], WGMMA_ROW)  # base 2 (`_base2_lse`)
        delta = load_vector(st, scratch["delta"].at[wg], WGMMA_ROW)
        q_seg = None
        if st.has_segments:
            q_seg = load_vector(st, scratch["q_seg"].at[wg], WGMMA_ROW)
        q_smem, d_out_smem = scratch["q"].at[wg], scratch["d_out"].at[wg]
        paired = q_smem.shape[-1] in PAIRED_DQ_HEAD_DIMS  # S and dP issued together

        def load_own_tile(step):
            """A redo's step: its K, V (bias, mask, key ids) into this consumer's own ring
            slot, cleaned where the step can hide a key (as the producer would clean them)."""
            landed = scratch["redo_landed"].at[wg]
            copies(step, wg, landed)
            plgpu.barrier_wait(landed)

            @pl.when(redo_cleaned(step))
            def _():
                clean_tile(scratch["k"].at[wg], scratch["v"].at[wg], poison_keys=False)
                plgpu.commit_smem()

        def visit(step, dq, *, masked: bool, redo: bool = False):
            if redo:
                slot = wg
                load_own_tile(step)
            else:
                slot = irem(step - lo, stages)
                _await_tile(scratch, step, slot, cleaned)
            k_smem, v_smem = scratch["k"].at[slot], scratch["v"].at[slot]
            k_first = _block_of(st, scratch, step) * block_kv
            if paired:
                qk, dp = mma_transposed_both(st, (q_smem, k_smem), (d_out_smem, v_smem))
            else:
                qk = mma_transposed(st, q_smem, k_smem)
            bias = mask = kv_seg = None
            own_rows = pl.ds(wg * block_q, block_q)
            if st.has_bias:
                bias = scratch["bias"][slot, own_rows].astype(jnp.float32)
            if st.has_mask:
                mask = scratch["mask"][slot, own_rows]
            if segments_read(st, masked):
                kv_seg = load_vector(st, scratch["kv_seg"].at[slot], WGMMA_COL)
            logits, scores, slope, user_visible = backward_tile_logits(
                st, qk, bias, b=batch, h=head, q_first=q_first, k_first=k_first,
                bounds=bounds, masked=masked, vectors=flex_vectors(st, q_seg, kv_seg),
            )  # fmt: skip
            if masked:
                logits = hide_invisible(
                    st,
                    logits,
                    q_first=q_first,
                    k_first=k_first,
                    bounds=bounds,
                    q_seg=q_seg,
                    kv_seg=kv_seg,
                    mask=mask,
                    user_visible=user_visible,
                )
            p = jnp.exp2(logits - lax.broadcast_in_dim(lse, shape, [0]))
            if not paired:
                dp = mma_transposed(st, d_out_smem, v_smem)
            ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
            if scores is not None:
                ds = ds * common.capped_logits_grad(scores, st.softcap)
            if slope is not None:  # d score_mod / d score
                ds = ds * slope
            dq = mma_accumulate(st, dq, ds.astype(k_smem.dtype), k_smem)
            if not redo:
                plgpu.barrier_arrive(scratch["consumed"].at[slot])
            return dq

        if st.flex_blocks:
            inner_lo, inner_hi = n_partial, hi
        else:
            _, inner_lo, inner_hi, _ = key_blocks(st, bounds, q_first, block_q)
            inner_lo, inner_hi = common.clip_inner(lo, hi, inner_lo, inner_hi)
        ranges = (lo, inner_lo, inner_hi, hi)

        def all_tiles(redo: bool):
            dq = layout_cast(st, jnp.zeros((block_q, q_smem.shape[-1]), jnp.float32), WGMMA)
            tile = functools.partial(visit, redo=redo)
            return common.visit_all(st, ranges, tile, dq, structural=st.flex_blocks or None)

        def store(dq):
            q_smem[...] = (dq * st.scale).astype(q_smem.dtype)  # Q is no longer needed
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, refs["dq"].at[batch, rows, head])
            plgpu.wait_smem_to_gmem(0)

        dq = all_tiles(redo=False)
        if not st.redo_hidden:  # (set only where tiles can hide keys: `_backward_static`)
            store(dq)
            return
        # st.redo_hidden: the tiles ran uncleaned, so a hidden key's NaN or inf in K or V (0 * NaN
        # in dS or in dS K) makes its rows' dQ non-finite. Once both consumers are past the ring
        # (the producer is done with it), one whose dQ has such a row computes it again with the
        # cleaning; a NaN or inf its rows do see comes back in the redo too.
        redo = nonfinite_rows(dq).max(axis=0) > 0
        plgpu.barrier_arrive(scratch["passed"])
        plgpu.barrier_wait(scratch["passed"])
        pl.when(~redo)(lambda: store(dq))
        pl.when(redo)(lambda: store(all_tiles(redo=True)))


# --- dk, dv -----------------------------------------------------------------------------------


def _query_blocks(st: Static, bounds, k_first, keys: int):
    """(lo, inner_lo, inner_hi, hi) of the query blocks that see keys [k_first, +keys), and the
    inner part whose queries see all of them (the dk/dv twin of `key_blocks`)."""
    q_offset, q_len, kv_len = bounds
    reach = dict(right=st.right, left=st.left)
    k_stop = jnp.minimum(k_first + keys, kv_len)
    lo, hi = common.query_block_range(
        k_first, k_stop, q_offset=q_offset, q_len=q_len, block_q=st.block_q, **reach
    )
    inner_lo, inner_hi = common.unmasked_query_blocks(
        lo,
        hi,
        k_first,
        q_offset=q_offset,
        q_len=q_len,
        kv_len=kv_len,
        block_q=st.block_q,
        block_k=keys,
        check_q_len=st.check_q_len,
        check_kv_len=st.check_kv_len,
        **reach,
    )
    return lo, inner_lo, inner_hi, hi


def _dkdv_kernel(refs, scratch, *, st: Static):
    # Roles swapped: st.block_kv key rows per consumer, st.block_q queries per pipeline step.
    # Q, K, V and dO sit in shared memory as st.head_parts column blocks of H / parts each.
    # One part: each consumer owns its own block_kv keys, all of dK and dV for them. Two parts
    # (H > 128, where dK and dV of 64 keys would not fit a consumer's registers): both consumers
    # take the same block_kv keys, compute the same S^T and dP^T, and each accumulates its own
    # half of dK's and dV's columns.
    block_q, block_kv, stages, parts = st.block_q, st.block_kv, st.num_stages, st.head_parts
    split = parts > 1
    cooperative = _cooperative_dq(st, scratch["k"].shape[-1])
    halves = _query_split(st)  # each consumer computes S^T, dP^T of half the step's queries
    half = block_q // CONSUMERS if halves else block_q

    def part_of(name: str, index, part):
        """Column part `part` of buffer `index` (a ring slot, or a consumer's keys) of Q, K, V
        or dO: their scratch is [buffers * parts, rows, H / parts], indexed by one number, so
        that an index is never half traced, half a Python int (JAX 0.11's Mosaic GPU lowering
        of a wgmma's run_state fails on a literal index beside a traced one)."""
        return scratch[name].at[index * parts + part]

    head, kv_tile = lax.axis_index("heads"), lax.axis_index("tiles")
    batch, wg = lax.axis_index("batch"), lax.axis_index("wg")
    bounds = _scalars(refs["bounds"], batch)
    program_first = kv_tile * keys_per_program(st)
    program_keys = pl.ds(program_first, keys_per_program(st))
    if st.flex_blocks:  # the listed query blocks: partial ones [0, n_partial), full ones after
        lo, (hi, n_partial) = 0, _await_visit_list(st, refs, scratch, batch, head, kv_tile)
    else:
        lo, _, _, hi = _query_blocks(st, bounds, program_first, keys_per_program(st))

    @pl.when(wg == CONSUMERS)
    def _producer():
        def copies(step, slot, barrier):
            rows = pl.ds(_block_of(st, scratch, step) * block_q, block_q)
            for name in ("q", "d_out"):
                for part in range(parts):  # operands [B, T, N * parts, H / parts]
                    plgpu.copy_gmem_to_smem(
                        refs[name].at[batch, rows, head * parts + part],
                        part_of(name, slot, part),
                        barrier,
                    )
            for name in ("lse", "delta"):
                plgpu.copy_gmem_to_smem(
                    refs[name].at[batch, head, rows], scratch[name].at[slot], barrier
                )
            for name in ("bias", "mask"):  # transposed: [B', N', S, T]
                if name in refs:
                    source = pair_window(refs[name], batch, head, program_keys, rows)
                    plgpu.copy_gmem_to_smem(source, scratch[name].at[slot], barrier)
            if st.has_segments:
                source = refs["q_seg"].at[batch, rows]
                plgpu.copy_gmem_to_smem(source, scratch["q_seg"].at[slot], barrier)

        _produce(scratch, lo, hi, stages, copies)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        # keys: this consumer's key buffer; own: the column part of dK, dV it accumulates
        keys_at, own = (0, wg) if split else (wg, 0)
        k_first = program_first + keys_at * block_kv
        keys = pl.ds(k_first, block_kv)
        kv_head = idiv(head, st.groups)
        ready = scratch["rows_produced"].at[keys_at]
        # one part: each consumer loads its own keys; two: consumer w loads part w of both's
        for name in ("k", "v"):
            plgpu.copy_gmem_to_smem(
                refs[name].at[batch, keys, kv_head * parts + own],
                part_of(name, keys_at, own),
                ready,
            )

        def load_key_segments():
            source = refs["kv_seg"].at[batch, keys]
            plgpu.copy_gmem_to_smem(source, scratch["kv_seg"].at[keys_at], ready)

        if st.has_segments and split:
            pl.when(wg == 0)(load_key_segments)
        elif st.has_segments:
            load_key_segments()
        plgpu.barrier_wait(ready)
        if st.fused_dq and st.clean_hidden:  # dQ += dS K: a hidden key's dS of 0 meets its K

            @pl.when(refs["bounds"][batch, NONFINITE] != 0)
            def _():
                k_own, v_own = part_of("k", keys_at, own), part_of("v", keys_at, own)
                clean_tile(k_own, v_own, poison_keys=False)
                plgpu.commit_smem()

            if split:  # both consumers read both parts: meet once both are clean
                plgpu.barrier_arrive(scratch["keys_done"])
                plgpu.barrier_wait(scratch["keys_done"])

        shape = (block_kv, half)  # transposed tiles: keys down, queries across
        kv_seg = None
        if st.has_segments:
            kv_seg = load_vector(st, scratch["kv_seg"].at[keys_at], WGMMA_ROW)
        k_parts = [part_of("k", keys_at, part) for part in range(parts)]
        v_parts = [part_of("v", keys_at, part) for part in range(parts)]
        out_head = head * parts + own  # outputs [B, S or T, N * parts, H / parts]

        def meet_consumers():
            """Both consumers at this point of the step (fused_dq: each one's dS^T in shared
            memory; query halves: each one's P^T and dS^T halves, or read)."""
            if st.interpret:  # the interpreter runs no PTX
                plgpu.barrier_arrive(scratch["consumers_met"])
                plgpu.barrier_wait(scratch["consumers_met"])
            else:
                named_barrier_sync(DS_BARRIER, CONSUMERS * THREADS_PER_WARPGROUP)

        def add_dq(step, q_first, ds_t):
            """fused_dq: dQ[block_q rows from q_first] += dS @ K, in chunks of DQ_CHUNK columns,
            so that only [bq, 64] of dQ sits in registers beside dK and dV; the scale is applied
            after the kernel. One part: the consumers' dS^T (of different keys) meet in shared
            memory and consumer w computes chunk w over both consumers' keys, as in
            FlashAttention-3's backward: each chunk of dQ is stored and added to global memory
            once per step, not once per consumer. Two parts: both consumers hold the same dS^T,
            and each computes the chunks of its own column part."""
            rows = pl.ds(q_first, block_q)
            if not cooperative:  # own dS^T, own keys (their column part when split)
                ds_own = scratch["ds"].at[wg]
                ds_refs, k_refs = [ds_own], [part_of("k", keys_at, own)]
            else:  # double-buffered: the other consumer may still read the last step's
                buffer = irem(step - lo, 2) * CONSUMERS
                ds_own = scratch["ds"].at[buffer + wg]
                ds_refs = [scratch["ds"].at[buffer + c] for c in range(CONSUMERS)]
                k_refs = [part_of("k", c, 0) for c in range(CONSUMERS)]
            ds_own[...] = ds_t  # [bk, bq]
            plgpu.commit_smem()
            if cooperative:
                meet_consumers()
            if "mma" in FUSED_DQ_OMIT:
                return
            dq_smem = scratch["dq"].at[wg]  # [bq, H / parts], or [bq, DQ_CHUNK] with one part
            if not st.interpret:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last dQ was read out
            width = k_refs[0].shape[-1]
            for chunk, first in enumerate(range(0, width, DQ_CHUNK)):
                cols = pl.ds(first, DQ_CHUNK)
                buffer_cols = pl.ds(0, DQ_CHUNK) if cooperative else cols

                def add_chunk(cols=cols, buffer_cols=buffer_cols):
                    dq = mma_lhs_transposed(st, ds_refs, [k.at[:, cols] for k in k_refs])
                    if st.interpret:  # no TMA reductions there: a zeroed output per consumer
                        target = refs["dq_acc"].at[wg, batch, rows, out_head, cols]
                        target[...] = target[...] + dq
                    elif "store" in FUSED_DQ_OMIT:  # a store that never runs keeps the wgmma

                        @pl.when(q_first < 0)
                        def _():
                            dq_smem.at[:, buffer_cols][...] = dq

                    else:
                        dq_smem.at[:, buffer_cols][...] = dq
                    if cooperative and not (st.interpret or "store" in FUSED_DQ_OMIT):
                        plgpu.commit_smem()
                        target = refs["dq_acc"].at[batch, rows, out_head, cols]
                        if "tma" not in FUSED_DQ_OMIT:
                            plgpu.copy_smem_to_gmem(dq_smem, target, reduction_op="add")

                if cooperative:
                    pl.when(wg == chunk % CONSUMERS)(add_chunk)
                else:
                    add_chunk()
            if not (cooperative or st.interpret or "store" in FUSED_DQ_OMIT):
                plgpu.commit_smem()
                target = refs["dq_acc"].at[batch, rows, out_head]
                if "tma" not in FUSED_DQ_OMIT:
                    plgpu.copy_smem_to_gmem(dq_smem, target, reduction_op="add")

        def visit(step, carry, *, masked: bool):
            dk, dv = carry
            slot = irem(step - lo, stages)
            plgpu.barrier_wait(scratch["produced"].at[slot])
            q_parts = [part_of("q", slot, part) for part in range(parts)]
            d_out_parts = [part_of("d_out", slot, part) for part in range(parts)]
            mine = pl.ds(wg * half, half)  # halves: this consumer's queries of the step

            def own_queries(ref):
                return ref.at[mine] if halves else ref

            lse = load_vector(st, own_queries(scratch["lse"].at[slot]), WGMMA_COL)  # base 2
            lse = lax.broadcast_in_dim(lse, shape, [1])
            delta = load_vector(st, own_queries(scratch["delta"].at[slot]), WGMMA_COL)
            delta = lax.broadcast_in_dim(delta, shape, [1])
            q_first = _block_of(st, scratch, step) * block_q + (wg * half if halves else 0)
            qk_t = mma_transposed(st, k_parts, [own_queries(q) for q in q_parts])
            bias = mask = q_seg = None
            own_keys = pl.ds(keys_at * block_kv, block_kv)
            if st.has_bias:
                bias = scratch["bias"][slot, own_keys].astype(jnp.float32)
            if st.has_mask:
                mask = scratch["mask"][slot, own_keys]
            if segments_read(st, masked):
                q_seg = load_vector(st, own_queries(scratch["q_seg"].at[slot]), WGMMA_COL)
            logits_t, scores_t, slope_t, user_visible = backward_tile_logits(
                st, qk_t, bias, b=batch, h=head, q_first=q_first, k_first=k_first,
                bounds=bounds, masked=masked, transposed=True,
                vectors=flex_vectors(st, q_seg, kv_seg),
            )  # fmt: skip
            if masked:
                logits_t = hide_invisible(
                    st,
                    logits_t,
                    q_first=q_first,
                    k_first=k_first,
                    bounds=bounds,
                    q_seg=q_seg,
                    kv_seg=kv_seg,
                    mask=mask,
                    transposed=True,
                    user_visible=user_visible,
                )
            p_t = jnp.exp2(logits_t - lse)
            dtype = k_parts[0].dtype
            if not halves:
                dv = mma_accumulate(st, dv, p_t.astype(dtype), part_of("d_out", slot, own))
            dp_t = mma_transposed(st, v_parts, [own_queries(d) for d in d_out_parts])
            ds_t = p_t * (dp_t - delta)
            if scores_t is not None:
                ds_t = ds_t * common.capped_logits_grad(scores_t, st.softcap)
            if slope_t is not None:  # d score_mod / d score
                ds_t = ds_t * slope_t
            ds_t = ds_t.astype(dtype)
            if halves:  # the other consumer's halves of P^T and dS^T, through shared memory
                p_t = p_t.astype(dtype)
                meet_consumers()  # the other consumer has read the last step's halves
                scratch["p_t"].at[wg][...] = p_t
                scratch["ds_t"].at[wg][...] = ds_t
                plgpu.commit_smem()
                meet_consumers()
                other = CONSUMERS - 1 - wg
                p_other = load_tile(st, scratch["p_t"].at[other])
                ds_other = load_tile(st, scratch["ds_t"].at[other])
                theirs = pl.ds(other * half, half)
                d_out_own, q_own = part_of("d_out", slot, own), part_of("q", slot, own)
                d_out_halves = [d_out_own.at[mine], d_out_own.at[theirs]]
                dv = mma_accumulate(st, dv, [p_t, p_other], d_out_halves)
                dk = mma_accumulate(st, dk, [ds_t, ds_other], [q_own.at[mine], q_own.at[theirs]])
            else:
                dk = mma_accumulate(st, dk, ds_t, part_of("q", slot, own))
            plgpu.barrier_arrive(scratch["consumed"].at[slot])  # dQ reads K and dS alone
            if st.fused_dq:
                add_dq(step, q_first, ds_t)
            return dk, dv

        if st.flex_blocks:
            inner_lo, inner_hi = n_partial, hi
        else:
            _, inner_lo, inner_hi, _ = _query_blocks(st, bounds, k_first, block_kv)
            inner_lo, inner_hi = common.clip_inner(lo, hi, inner_lo, inner_hi)
        part_width = k_parts[0].shape[-1]
        zeros = layout_cast(st, jnp.zeros((block_kv, part_width), jnp.float32), WGMMA)
        ranges = (lo, inner_lo, inner_hi, hi)
        dk, dv = common.visit_all(
            st, ranges, visit, (zeros, zeros), structural=st.flex_blocks or None
        )
        if split:  # the other consumer may still read K and V: meet before writing over them
            plgpu.barrier_arrive(scratch["keys_done"])
            plgpu.barrier_wait(scratch["keys_done"])
        elif cooperative:  # the other consumer may still read this one's K for its dQ chunk
            meet_consumers()
        k_out, v_out = part_of("k", keys_at, own), part_of("v", keys_at, own)
        k_out[...] = (dk * st.scale).astype(k_out.dtype)  # K and V are no longer needed
        v_out[...] = dv.astype(v_out.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_out, refs["dk"].at[batch, keys, out_head])
        plgpu.copy_smem_to_gmem(v_out, refs["dv"].at[batch, keys, out_head])
        plgpu.wait_smem_to_gmem(0)


# --- launch -----------------------------------------------------------------------------------


def _launch(
    kernel, st: Static, operands: dict, scratch: dict, out_names, out_type, grid, *, mutable=False
):
    """Run `kernel` over grid (heads, tiles, batch) with a producer and CONSUMERS warpgroups.
    mutable: some operands are Refs (run_state's, aliased in and out, written in place):
    launched by pl.kernel on a plgpu.Mesh, as plgpu.kernel's vmap wrapper does not take them;
    in interpret mode (no Ref operands there) the outputs then start zeroed."""

    def body(*refs):
        names = list(operands) + list(out_names)
        named = dict(zip(names, refs[: len(names)], strict=True))

        def with_scratch(*buffers):
            kernel(named, dict(zip(scratch, buffers, strict=True)), st=st)

        pl.run_scoped(with_scratch, *scratch.values(), collective_axes="wg")

    mesh = dict(
        grid=grid,
        grid_names=("heads", "tiles", "batch"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
    )
    params = plgpu.CompilerParams(approx_math=True)
    if mutable:
        return pl.kernel(
            body,
            out_type=tuple(out_type),
            mesh=plgpu.Mesh(**mesh),
            compiler_params=params,
            name=kernel.__name__.strip("_"),
            **interpret_kwargs(st, zeroed=True),
        )(*operands.values())
    return plgpu.kernel(
        body, out_type=out_type, **mesh, compiler_params=params, **interpret_kwargs(st)
    )(*operands.values())


def block_mask_fits(st: Static, block_mask: tuple[int, int]) -> bool:
    """Whether the backward kernels of `st` (block sizes, head parts) can visit a block mask of
    (bq, bk) blocks: a dq program's rows and a dk/dv program's keys each inside one block, and
    whole kernel tiles per block."""
    mask_q, mask_kv = block_mask
    return mask_q % (CONSUMERS * st.block_q) == 0 and mask_kv % keys_per_program(st) == 0


def _visit_scratch(operands: dict) -> dict:
    """Shared memory for a program's flex visit list (when the operands carry lists)."""
    if "visits" not in operands:
        return {}
    width = operands["visits"].shape[-1]
    return dict(visits=plgpu.SMEM((width,), jnp.int32), visits_ready=plgpu.Barrier())


def _dq(st: Static, operands: dict, pairs: dict, barriers, shape, dtype) -> Array:
    """dQ [B, T_pad, N, Hp] by the dq kernel: the forward's schedule with dO, lse and delta
    riding along with Q."""
    batch, t_pad, num_heads, h_pad = shape
    block_q, block_kv, stages = st.block_q, st.block_kv, st.num_stages
    rows_per_program = CONSUMERS * block_q
    # dQ += dS K contracts block_kv keys: a K of 32 16-bit keys takes a 64-byte swizzle, and
    # wgmma takes both operands of each matmul at one swizzle (`_dq_static`)
    swizzle = min(128, block_kv * jnp.dtype(dtype).itemsize)
    scratch = {
        name: tiled((CONSUMERS, block_q, h_pad), dtype, swizzle) for name in ("q", "d_out")
    } | {name: plgpu.SMEM((CONSUMERS, block_q), jnp.float32) for name in ("lse", "delta")}
    scratch |= {name: tiled((stages, block_kv, h_pad), dtype, swizzle) for name in ("k", "v")}
    for name, x in pairs.items():
        scratch[name] = tiled((stages, rows_per_program, block_kv), x.dtype)
    has_seg = int(st.has_segments)
    if has_seg:
        scratch["q_seg"] = plgpu.SMEM((CONSUMERS, block_q), jnp.int32)
        scratch["kv_seg"] = plgpu.SMEM((stages, block_kv), jnp.int32)
    copies = 2 + len(pairs) + has_seg
    scratch |= barriers(copies, 4 + has_seg, stages) | _visit_scratch(operands)
    if st.redo_hidden:  # a consumer's own copies in a redo; the consumers' meeting before it
        scratch["redo_landed"] = plgpu.Barrier(num_arrivals=copies, num_barriers=CONSUMERS)
        scratch["passed"] = plgpu.Barrier(num_arrivals=CONSUMERS)
    elif st.clean_hidden:  # masked steps: the copies land on `arrived`, `cleaned` releases them
        scratch["arrived"] = plgpu.Barrier(num_arrivals=copies, num_barriers=stages)
        scratch["cleaned"] = plgpu.Barrier(num_barriers=stages)
    (dq,) = _launch(
        _dq_kernel,
        st,
        operands | pairs,
        scratch,
        ["dq"],
        [jax.ShapeDtypeStruct(shape, dtype)],
        (num_heads, t_pad // rows_per_program, batch),
    )
    return dq


def backward(
    st: Static,
    query: Array,  # [B, T, N, H]
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    bias: Array | None,  # [B', N', T', S']
    mask: Array | None,  # [B', N', T', S'] bool
    bounds: Array,  # [B, 4] int32
    segment_ids: tuple[Array, Array] | None,
    out: Array,  # [B, T, N, H]
    lse: Array,  # [B, T, N] float32
    d_out: Array,  # [B, T, N, H]
    d_lse: Array,  # [B, T, N] float32
    visits: tuple[Array, Array] | None = None,  # st.flex_blocks: ([B', N', QB, L], [.., KB, L'])
    *,
    values_flagged: bool = False,  # bounds carry the forward's flag of V: only K is read
) -> tuple[Array, Array, Array]:  # dq, dk, dv
    """dq, dk, dv. Under a flex block mask (st.flex_blocks, st.flex.block_mask = (bq, bk)) the
    dq kernel visits each query block's listed key blocks and the dk/dv kernel each key block's
    listed query blocks (`flash_mosaic._visit_lists` of BlockMask.kv_blocks and .q_blocks);
    `block_mask_fits` says which configs can. With st.fused_dq, whose launch with dQ as a Ref
    does not batch, jax.vmap's axes are folded into B (`folding_vmap`)."""
    if not st.redo_hidden:  # with it the dq kernel redoes what went non-finite: nothing read
        flagged = (key,) if values_flagged else (key, value)  # `flag_nonfinite`
        bounds = flag_nonfinite(st, bounds, *flagged)
    args = (query, key, value, bias, mask, bounds, segment_ids, out, lse, d_out, d_lse, visits)
    if st.fused_dq:
        per_pair = (3, 4, 11)  # bias, mask, visits: [B', ...], where B' = 1 broadcasts
        return folding_vmap(functools.partial(_backward, st), query.shape[0], per_pair)(*args)
    return _backward(st, *args)


def folding_vmap(fn, batch: int, broadcast: tuple[int, ...] = ()):
    """fn, whose arguments are pytrees of arrays [B, ...] (B = batch; [B or 1, ...] for the
    arguments at the positions `broadcast`) and whose outputs are [B, ...], with a jax.vmap
    rule that folds the mapped axis V into B: fn runs once on [V * B, ...] and its outputs come
    back as [V, B, ...]. Unmapped arguments are tiled V times, except a broadcast one of 1,
    which stays; a mapped broadcast one of 1 is broadcast to B first. For a kernel launch that
    batches no other way (attention is independent per batch row)."""

    @jax.custom_batching.custom_vmap
    def folded(*args):
        return fn(*args)

    @folded.def_vmap
    def _(axis_size, in_batched, *args):
        def fold(x, mapped: bool, stays: bool):
            if not mapped:
                return x if stays else jnp.tile(x, (axis_size,) + (1,) * (x.ndim - 1))
            if x.shape[1] == 1 and batch > 1:
                x = jnp.broadcast_to(x, (axis_size, batch, *x.shape[2:]))
            return x.reshape(axis_size * x.shape[1], *x.shape[2:])

        args = [
            jax.tree.map(lambda x, m, i=i: fold(x, m, i in broadcast and x.shape[0] == 1), a, b)
            for i, (a, b) in enumerate(zip(args, in_batched, strict=True))
        ]
        outs = folding_vmap(fn, axis_size * batch, broadcast)(*args)
        outs = jax.tree.map(lambda y: y.reshape(axis_size, batch, *y.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return folded


def _backward(
    st: Static, query, key, value, bias, mask, bounds, segment_ids, out, lse, d_out, d_lse, visits
):
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    block_q, block_kv, stages = st.block_q, st.block_kv, st.num_stages
    q_tile, kv_tile = padding_tiles(st)
    t_pad = -(-q_len // q_tile) * q_tile
    s_pad = -(-kv_len // kv_tile) * kv_tile
    h_pad = backward_head_dim(head_dim, st.head_parts)
    dtype = query.dtype

    def rows(x, size):
        return common.pad_last(common.pad_to(x, 1, size), h_pad)

    delta = jnp.einsum(
        "btnh,btnh->bnt",
        d_out.astype(jnp.float32),
        out.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    ) - jnp.swapaxes(d_lse.astype(jnp.float32), 1, 2)
    # A row that saw a non-finite key has a NaN lse (`clean_tile`): as lse +inf and delta 0 its
    # p and dS are 0, so its NaN reaches no key's gradient through the 0 of a hidden key's p
    # (its own dq is then 0: a poisoned row's gradients are unspecified).
    poisoned = jnp.isnan(lse)
    lse = jnp.where(poisoned, jnp.inf, lse)
    delta = jnp.where(jnp.swapaxes(poisoned, 1, 2), 0.0, delta)
    operands = {
        "q": rows(query, t_pad),
        "k": rows(key, s_pad),
        "v": rows(value, s_pad),
        "d_out": rows(d_out.astype(dtype), t_pad),
        # [B, N, T_pad], base 2; padded rows: 0
        "lse": common.pad_to(jnp.swapaxes(_base2_lse(lse), 1, 2), 2, t_pad),
        "delta": common.pad_to(delta, 2, t_pad),
        "bounds": bounds,  # flagged by `backward`
    }
    pairs = {}
    if bias is not None:
        pairs["bias"] = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len))
        pairs["bias"] = pairs["bias"].astype(bias_dtype(bias.dtype))
    if mask is not None:
        pairs["mask"] = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len)).astype(jnp.int8)
    pairs = {name: common.pad_to(common.pad_to(x, 2, t_pad), 3, s_pad) for name, x in pairs.items()}
    if segment_ids is not None:
        operands["q_seg"] = common.pad_to(segment_ids[0].astype(jnp.int32), 1, t_pad, -1)
        operands["kv_seg"] = common.pad_to(segment_ids[1].astype(jnp.int32), 1, s_pad, -2)

    def barriers(copies, row_copies, stages):  # (each kernel's own ring depth)
        return dict(
            rows_produced=plgpu.Barrier(num_arrivals=row_copies, num_barriers=CONSUMERS),
            produced=plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
            consumed=plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        )

    has_seg = int(segment_ids is not None)
    parts = st.head_parts
    program_keys = keys_per_program(st)
    dq_st = dkdv_st = st
    if st.flex_blocks:
        mask_q, mask_kv = st.flex.block_mask
        dq_st = dataclasses.replace(
            st, flex_steps=mask_kv // block_kv, flex_programs=mask_q // (CONSUMERS * block_q)
        )
        dkdv_st = dataclasses.replace(
            st, flex_steps=mask_q // block_q, flex_programs=mask_kv // program_keys
        )
        # Kernel tiles larger than the blocks pad T and S past the blocks' count: the programs
        # there read empty lists (n = 0), not rows past the end.
        visits = (
            common.pad_to(visits[0], 2, t_pad // mask_q),
            common.pad_to(visits[1], 2, s_pad // mask_kv),
        )
    if not st.fused_dq:
        dq_st = _dq_static(dq_st, bool(pairs))
        dq_operands = operands | ({"visits": visits[0]} if st.flex_blocks else {})
        dq = _dq(dq_st, dq_operands, pairs, barriers, (batch, t_pad, num_heads, h_pad), dtype)

    # dk, dv: per query head, bias and mask transposed to [B', N', S, T]; the head dim in
    # st.head_parts column blocks ([B, T, N, H] -> [B, T, N * parts, H / parts]: a reshape).
    stages = st.dkdv_stages or stages
    dkdv_st = dataclasses.replace(dkdv_st, num_stages=stages)
    part_width = h_pad // parts
    key_buffers = 1 if parts > 1 else CONSUMERS

    def in_parts(x):
        return x.reshape(*x.shape[:2], x.shape[2] * parts, part_width)

    operands = operands | {name: in_parts(operands[name]) for name in ("q", "k", "v", "d_out")}
    pairs_t = {name: jnp.swapaxes(x, 2, 3) for name, x in pairs.items()}
    # Q, K, V, dO: [buffers * parts, rows, H / parts] (`part_of` in the kernel)
    # query halves: dV += P^T dO over K = bq / 2 queries, so every operand at a 64-byte swizzle
    swizzle = DKDV_SWIZZLE or (64 if _query_split(dkdv_st) else 128)
    scratch = {
        name: tiled((key_buffers * parts, block_kv, part_width), dtype, swizzle)
        for name in ("k", "v")
    }
    scratch |= {
        name: tiled((stages * parts, block_q, part_width), dtype, swizzle)
        for name in ("q", "d_out")
    }
    scratch |= {name: plgpu.SMEM((stages, block_q), jnp.float32) for name in ("lse", "delta")}
    for name, x in pairs_t.items():
        scratch[name] = tiled((stages, program_keys, block_q), x.dtype)
    if segment_ids is not None:
        scratch["q_seg"] = plgpu.SMEM((stages, block_q), jnp.int32)
        scratch["kv_seg"] = plgpu.SMEM((key_buffers, block_kv), jnp.int32)
    scratch |= barriers(2 * parts + 2 + len(pairs) + has_seg, 2 * parts + has_seg, stages)
    if parts > 1:  # (rows_produced: barrier 0 only, K and V parts of both consumers)
        scratch["keys_done"] = plgpu.Barrier(num_arrivals=CONSUMERS)
    if _query_split(dkdv_st):  # each consumer's half of P^T and dS^T [bk, bq / 2]
        for name in ("p_t", "ds_t"):
            scratch[name] = tiled((CONSUMERS, block_kv, block_q // CONSUMERS), dtype, swizzle)
        if st.interpret:
            scratch["consumers_met"] = plgpu.Barrier(num_arrivals=CONSUMERS)
    if st.flex_blocks:
        operands = operands | {"visits": visits[1]}
        scratch |= _visit_scratch(operands)
    per_head = jax.ShapeDtypeStruct((batch, s_pad, num_heads * parts, part_width), dtype)
    outs = {"dk": per_head, "dv": per_head}
    operands = operands | pairs_t
    if st.fused_dq:  # dS^T [bk, bq] and a float32 dQ tile per consumer (`add_dq`)
        cooperative = _cooperative_dq(dkdv_st, part_width)
        ds_buffers, dq_width = (2 * CONSUMERS, DQ_CHUNK) if cooperative else (CONSUMERS, part_width)
        scratch["ds"] = tiled((ds_buffers, block_kv, block_q), dtype)
        scratch["dq"] = tiled((CONSUMERS, block_q, dq_width), jnp.float32)
        if cooperative and st.interpret:
            scratch["consumers_met"] = plgpu.Barrier(num_arrivals=CONSUMERS)
        dq_shape = (batch, t_pad, num_heads * parts, part_width)
        if st.interpret:
            outs["dq_acc"] = jax.ShapeDtypeStruct((CONSUMERS, *dq_shape), jnp.float32)
    grid = (num_heads, s_pad // program_keys, batch)
    if st.fused_dq and not st.interpret:
        # dQ is added into in place (TMA reduce-add), so the launch takes dK, dV and dQ as Refs,
        # created and read back by run_state: no Ref outlives this function, which lets
        # `folding_vmap`'s custom_vmap hold it (a jax.new_ref there has no state discharge
        # rule: stop 33). dK and dV start as zeros the kernel overwrites.

        def in_place(refs):
            dk, dv, dq_acc = refs
            in_out = operands | {"dk": dk, "dv": dv, "dq_acc": dq_acc}
            _launch(_dkdv_kernel, dkdv_st, in_out, scratch, [], [], grid, mutable=True)

        zeros = jnp.zeros(per_head.shape, dtype)
        results = pl.run_state(in_place)((zeros, zeros, jnp.zeros(dq_shape, jnp.float32)))
    else:
        kernel_outs = (list(outs), list(outs.values()))
        results = _launch(
            _dkdv_kernel, dkdv_st, operands, scratch, *kernel_outs, grid, mutable=st.fused_dq
        )
    dk, dv = (g.reshape(batch, s_pad, num_heads, h_pad) for g in results[:2])
    if st.fused_dq:
        dq = results[2].sum(axis=0) if st.interpret else results[2]
        dq = (dq.reshape(batch, t_pad, num_heads, h_pad) * st.scale).astype(dtype)

    def kv_grad(g):  # [B, S_pad, N, Hp] per query head -> [B, S, K, H], summed in float32
        g = g[:, :kv_len, :, :head_dim].astype(jnp.float32)
        g = g.reshape(batch, kv_len, num_kv_heads, st.groups, head_dim).sum(axis=3)
        return g.astype(key.dtype)

    return dq[:, :q_len, :, :head_dim], kv_grad(dk), kv_grad(dv)
