"""Fused Token Statistics Self-Attention (ToST, Wu et al., ICLR 2025) on Pallas' Triton backend.

TSSA replaces pairwise attention by per-head second moments of the tokens (formulas and the
official code: `jattn.reference.token_statistics_attention`). Per batch element, head h, token t
and coordinate c of w `[B, T, N, H]`:

  non-causal:  nu2_c = max(sum_t w_tc^2, 1e-24)            (F.normalize's eps on the norm)
               s_th  = sum_c w_tc^2 / nu2_c
  causal:      C1_tc = max(sum_{i<=t} w_ic^2, 1e-12)       (the eps on the squared sum)
               s_th  = sum_c w_tc^2 / C1_tc + H * denom_bias[h, t]
  both:        Pi_th = softmax over the N heads of temperature_h * s_th
               m_tc  = sum_i Pi_ih w_ic^2 / (sum_i Pi_ih + 1e-8)   (all i, or i <= t when causal)
               y_tc  = -Pi_th w_tc / (1 + m_tc)

The softmax couples the N heads of a token, so a tile holds whole token rows `[block_t, N, H]`
and tiles only the token axis. The statistics are global (non-causal) or prefix sums (causal)
over tokens, so every variant takes three passes over w, each parallel over chunks of tokens:

  1. per-chunk column sums of w^2;                      XLA: total (non-causal) / exclusive scan
  2. Pi from those, per-chunk sums of Pi w^2 and Pi;    XLA: total / exclusive scan
  3. y (the causal kernel rebuilds the running sums inside the chunk with a cumsum along tokens).

No pass can be dropped: Pi depends non-linearly on the finished column sums of pass 1, and m on
the finished Pi-sums of pass 2. The middle pass walks the chunks in reverse order, so it starts
on the tokens the previous pass left in L2 (and the last pass on those the middle one left).
The state between passes is O(D) per chunk. The backward (custom_vjp, derived below) takes three
passes over (w, dy) the same way: the moment gradient, the logit gradient (whose sums feed the
normalisation gradient), then dw; the causal one carries reverse (suffix) sums instead.

Limits: N and H are padded to powers of two (Triton tiles), T to a multiple of the chunk; the
padding copies w only when a shape needs it, padded heads are masked out of the softmax and
padded tokens out of every sum. Accumulation is float32 for every input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import check_config_fields, interpret_mode, triton_params

NORM_EPS_SQ = 1e-24  # non-causal: F.normalize clamps the column norm at 1e-12, i.e. its square
CAUSAL_SQ_EPS = 1e-12  # causal: the running sum of squares is clamped at this
PI_EPS = 1e-8  # added to the token sum of Pi before dividing
TILE_ELEMENTS = 4096  # elements of one [block_t, N, H] tile of the backward: 32 float32
# registers a thread at 4 warps per live tensor, which keeps the causal backward (about 12 live
# tiles) out of spills
BACKWARD_WARPS = 4
# The forward's tile: half as many elements on half the warps (32 a thread still). H200, bf16,
# N = 8, H = 64, forward alone, against 4096 on 4 warps: 11% (non-causal) and 27-37% (causal)
# faster at 64k and 262k tokens (stop 29, `benchmarks/tssa_variants.py` b4_w2); whole token rows
# inside one warp (2 tokens, 1 warp) were slower.
FORWARD_TILE_ELEMENTS = 2048
FORWARD_WARPS = 2
TARGET_PROGRAMS = 1024  # chunks in flight across B * T: several waves over 132 SMs
MAX_BLOCK_T = 256  # tokens per tile at most (tiny rows)
MAX_CHUNK_T = 1024  # tokens per program at most (longer chunks only shrink the parallelism)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of the TSSA kernels. None picks the heuristic default for the shape."""

    block_t: int | None = None  # tokens per tile (power of two): a tile is [block_t, N, H]
    chunk_t: int | None = None  # tokens per program (multiple of block_t): one state per chunk
    num_warps: int | None = None  # None: FORWARD_WARPS for the forward passes
    num_stages: int = 2
    reverse_middle_pass: bool = True  # walk the middle pass backwards for L2 reuse
    single_pass: bool = False  # causal forward in one launch with look-back (measured slower)
    # the middle pass writes Pi [B, T, N] (float32) for the output pass; None: causal only
    # (H200, bf16: causal forward 23-34% faster from 64k tokens; non-causal within noise)
    store_pi: bool | None = None
    # reciprocals by PTX rcp.approx (one instruction), not range-checked divisions (`_reciprocal`)
    approx_reciprocal: bool = True
    # the backward's own tile and warps (same chunks). None: TILE_ELEMENTS on BACKWARD_WARPS
    # (or the block_t and num_warps given) for non-causal; half the tile on half the warps for
    # causal (its tiles hold ~12 live tensors: H200, bf16, N=8, H=64, 4 tokens on 2 warps
    # against 8 on 4: forward + backward 16-20% faster from 4k to 262k tokens; non-causal 2-14%
    # slower that way)
    backward_block_t: int | None = None
    backward_num_warps: int | None = None

    def __post_init__(self):
        check_config_fields(
            self,
            ints=("num_warps", "num_stages", "chunk_t", "backward_num_warps"),
            powers_of_two=("block_t", "backward_block_t"),
            bools=("reverse_middle_pass", "single_pass", "store_pi", "approx_reciprocal"),
            optional=(
                "block_t",
                "chunk_t",
                "num_warps",
                "store_pi",
                "backward_block_t",
                "backward_num_warps",
            ),
        )
        for name in ("block_t", "backward_block_t"):
            block = getattr(self, name)
            if block is not None and self.chunk_t is not None and self.chunk_t % block:
                raise ValueError(
                    f"Config.chunk_t = {self.chunk_t} must be a multiple of {name} = {block}"
                )


@dataclasses.dataclass(frozen=True)
class _Tiling:
    block_t: int
    chunk_t: int
    num_chunks: int
    padded_len: int
    backward_block_t: int  # the backward's tile (divides chunk_t)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def tiling(batch: int, seq_len: int, row: int, config: Config, causal: bool = False) -> _Tiling:
    """Tile and chunk lengths for `seq_len` tokens of `row` (padded N * H) elements."""
    block_t = config.block_t or max(1, _pow2_floor(FORWARD_TILE_ELEMENTS // row))
    block_t = min(block_t, MAX_BLOCK_T, _pow2_ceil(seq_len))
    chunk_t = config.chunk_t
    if chunk_t is None:
        chunk_t = _pow2_ceil(-(-batch * seq_len // TARGET_PROGRAMS))
        chunk_t = min(max(chunk_t, block_t), MAX_CHUNK_T, max(_pow2_ceil(seq_len), block_t))
    if chunk_t % block_t:
        raise ValueError(f"chunk_t = {chunk_t} must be a multiple of block_t = {block_t}")
    backward_block_t = config.backward_block_t
    if backward_block_t is None:
        base = config.block_t or max(1, _pow2_floor(TILE_ELEMENTS // row))
        backward_block_t = min(max(1, base // 2) if causal else base, MAX_BLOCK_T)
    backward_block_t = min(backward_block_t, chunk_t)
    if chunk_t % backward_block_t:
        raise ValueError(
            f"chunk_t = {chunk_t} must be a multiple of backward_block_t = {backward_block_t}"
        )
    num_chunks = -(-seq_len // chunk_t)
    return _Tiling(block_t, chunk_t, num_chunks, num_chunks * chunk_t, backward_block_t)


# --- kernel bodies -------------------------------------------------------------------------
# Every kernel runs on a grid (B, num_chunks); program (b, j) owns the chunk `chunk(j)` of
# batch element b and walks it in tiles of `block_t` tokens. `rows` is [block_t, N, H] float32.


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    has_bias: bool
    seq_len: int  # true T (padded tokens are masked)
    block_t: int
    num_tiles: int  # tiles per chunk
    num_chunks: int
    reverse: bool  # this call walks the chunks backwards
    store_pi: bool = False  # Pi goes from the middle pass to the output pass through memory
    approx: bool = False  # reciprocals by the GPU's approximate instruction (`_reciprocal`)


def _chunk_index(st: _Static):
    j = pl.program_id(1)
    return st.num_chunks - 1 - j if st.reverse else j


def _tile_slice(st: _Static, i):
    return pl.ds(pl.multiple_of(i * st.block_t, st.block_t), st.block_t)


def _chunk_start(st: _Static):
    """First token of this program's chunk (read outside loops: interpret mode needs that)."""
    return _chunk_index(st) * (st.num_tiles * st.block_t)


def _valid_tokens(st: _Static, start, i):
    """[block_t] bool: tokens of tile i of the chunk at `start` that lie before the true T."""
    return start + i * st.block_t + lax.iota(jnp.int32, st.block_t) < st.seq_len


def _load_rows(ref, st: _Static, i):
    return ref[0, _tile_slice(st, i), :, :].astype(jnp.float32)  # [block_t, N, H]


def _reciprocal(x, approx: bool):
    """1 / x, float32. approx (on the GPU, not interpreted): PTX `rcp.approx.ftz.f32`, one
    MUFU instruction (relative error about 2^-23; subnormals flushed: every x here is a clamped
    or offset sum, at least 1e-12), where `1 / x` compiles to a range-checked division of about
    seven (SASS of the causal backward, stop 29: four such divisions an element of w)."""
    if not approx or interpret_mode():
        return 1.0 / x
    (out,) = pltriton.elementwise_inline_asm(
        "rcp.approx.ftz.f32 $0, $1;",
        args=[x],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return out


def _softmax_over_heads(logits, valid, approx: bool = False):
    """Pi [block_t, N]: softmax over heads; padded heads have logit -inf, padded tokens get 0."""
    logits = logits - jnp.max(logits, axis=1, keepdims=True)
    e = jnp.exp(logits)
    pi = e * _reciprocal(jnp.sum(e, axis=1, keepdims=True), approx)
    return jnp.where(valid[:, None], pi, 0.0)


def _causal_pi(w, c1, temp, head_bias, bias, valid, approx: bool = False):
    """Pi of one causal tile given the running sum of w^2 before it (c1 [N, H]).

    w [block_t, N, H]; bias [block_t, N] (H * denom_bias) or None. Returns a dict of tiles.
    """
    w2 = w * w
    run1 = c1[None] + lax.cumsum(w2, axis=0)
    # one reciprocal an element; the backward multiplies by it where it divided by C1 and C1^2
    inv_denom = _reciprocal(jnp.maximum(run1, CAUSAL_SQ_EPS), approx)
    s = jnp.sum(w2 * inv_denom, axis=-1)  # [block_t, N]
    if bias is not None:
        s = s + bias
    pi = _softmax_over_heads(s * temp[None, :] + head_bias[None, :], valid, approx)
    return dict(w2=w2, run1=run1, inv_denom=inv_denom, s=s, pi=pi)


def _causal_tile(w, c1, c2, c3, temp, head_bias, bias, valid, approx: bool = False):
    """Forward quantities of one causal tile given the running sums before it.

    w [block_t, N, H]; c1, c2 [N, H] (sums of w^2 and Pi w^2 before the tile); c3 [N] (of Pi);
    bias [block_t, N] (H * denom_bias) or None. Returns a dict of [block_t, ...] tiles.
    """
    f = _causal_pi(w, c1, temp, head_bias, bias, valid, approx)
    pw2 = f["pi"][:, :, None] * f["w2"]
    run2 = c2[None] + lax.cumsum(pw2, axis=0)
    inv3 = _reciprocal(c3[None] + lax.cumsum(f["pi"], axis=0) + PI_EPS, approx)  # [block_t, N]
    a = _reciprocal(1.0 + run2 * inv3[:, :, None], approx)
    return dict(f, pw2=pw2, run2=run2, inv3=inv3, a=a)


def _noncausal_tile(w, inv_nu2, temp, head_bias, valid, approx: bool = False):
    """Pi of one non-causal tile; inv_nu2 [N, H] = 1 / nu2 (a multiply per element, not a
    division: the reciprocal is taken once per tile or program)."""
    w2 = w * w
    s = jnp.sum(w2 * inv_nu2[None], axis=-1)  # [block_t, N]
    pi = _softmax_over_heads(s * temp[None, :] + head_bias[None, :], valid, approx)
    return dict(w2=w2, s=s, pi=pi)


def _causal_grads(f, w, g, temp, r2, r3):
    """Causal backward of one tile down to the logits.

    f: `_causal_tile`'s dict; g [block_t, N, H] = dy; r2 [block_t, N, H] / r3 [block_t, N]: the
    suffix sums over tokens i >= t of the running-moment gradients dC2 / dC3.
    """
    d_pi = jnp.sum(w * (r2 * w - f["a"] * g), axis=-1) + r3  # [block_t, N]
    d_logit = f["pi"] * (d_pi - jnp.sum(f["pi"] * d_pi, axis=1, keepdims=True))
    d_s = d_logit * temp[None, :]
    # s = sum_c w^2 / max(C1, eps): d C1 = -d s w^2 / C1^2 where the clamp is inactive
    d_run1 = jnp.where(
        f["run1"] > CAUSAL_SQ_EPS, -d_s[:, :, None] * f["w2"] * (f["inv_denom"] ** 2), 0.0
    )
    return d_logit, d_s, d_run1


def _moment_grads(f, w, pag):
    """d C2 [block_t, N, H] and d C3 [block_t, N] of one causal tile (local: m_t uses C_t);
    pag = Pi a dy, the product the output's own gradient term shares."""
    d_m = pag * w * f["a"]  # dy Pi w a^2
    d_run2 = d_m * f["inv3"][:, :, None]
    d_run3 = -jnp.sum(d_m * f["run2"], axis=-1) * f["inv3"] * f["inv3"]
    return d_run2, d_run3


def _fwd_sq_kernel(
    w_ref,  # [1, chunk_t, N, H]
    s1_ref,  # [1, 1, N, H] out: sum of w^2 over the chunk
    *,
    st: _Static,
):
    def body(i, acc):
        w = _load_rows(w_ref, st, i)
        return acc + jnp.sum(w * w, axis=0)

    s1_ref[0, 0] = lax.fori_loop(0, st.num_tiles, body, jnp.zeros(s1_ref.shape[2:], jnp.float32))


def _fwd_pi_kernel(
    w_ref,  # [1, chunk_t, N, H]
    c1_ref,  # [1, 1, N, H]: nu2 (non-causal) / sum of w^2 before the chunk (causal)
    temp_ref,  # [N]
    head_bias_ref,  # [N]: 0 for real heads, -inf for padding
    *rest,  # bias_ref [chunk_t, N] (causal with denom_bias); out: s2_ref [1,1,N,H], s3_ref
    # [1,1,N], pi_ref [1, chunk_t, N] (with store_pi)
    st: _Static,
):
    bias_ref = rest[0] if st.has_bias else None
    pi_ref = rest[-1] if st.store_pi else None
    s2_ref, s3_ref = rest[-3:-1] if st.store_pi else rest[-2:]
    start = _chunk_start(st)
    temp, head_bias = temp_ref[...], head_bias_ref[...]
    c1 = c1_ref[0, 0]
    inv_nu2 = 1.0 / c1  # non-causal only: c1 is nu2 there
    zeros2 = jnp.zeros(s2_ref.shape[2:], jnp.float32)
    zeros3 = jnp.zeros(s3_ref.shape[2:], jnp.float32)

    def body(i, carry):
        acc1, acc2, acc3 = carry
        w, valid = _load_rows(w_ref, st, i), _valid_tokens(st, start, i)
        if st.causal:
            bias = bias_ref[_tile_slice(st, i), :] if bias_ref is not None else None
            f = _causal_pi(w, acc1, temp, head_bias, bias, valid, st.approx)
            acc1 = acc1 + jnp.sum(f["w2"], axis=0)
            pw2 = f["pi"][:, :, None] * f["w2"]
        else:
            f = _noncausal_tile(w, inv_nu2, temp, head_bias, valid, st.approx)
            pw2 = f["pi"][:, :, None] * f["w2"]
        if pi_ref is not None:
            pi_ref[0, _tile_slice(st, i), :] = f["pi"]
        return acc1, acc2 + jnp.sum(pw2, axis=0), acc3 + jnp.sum(f["pi"], axis=0)

    _, s2, s3 = lax.fori_loop(0, st.num_tiles, body, (c1, zeros2, zeros3))
    s2_ref[0, 0] = s2
    s3_ref[0, 0] = s3


def _fwd_out_kernel(
    w_ref,  # [1, chunk_t, N, H]
    c1_ref,  # [1, 1, N, H]: nu2 / running sum of w^2 before the chunk
    c2_ref,  # [1, 1, N, H]: a = 1 / (1 + m) / running sum of Pi w^2 before the chunk
    c3_ref,  # [1, 1, N]: unused / running sum of Pi before the chunk
    temp_ref,  # [N]
    head_bias_ref,  # [N]
    *rest,  # bias_ref [chunk_t, N] (causal with denom_bias), pi_ref [1, chunk_t, N] (with
    # store_pi); out: y_ref [1, chunk_t, N, H]
    st: _Static,
):
    bias_ref = rest[0] if st.has_bias else None
    pi_ref = rest[-2] if st.store_pi else None
    y_ref = rest[-1]
    start = _chunk_start(st)
    temp, head_bias = temp_ref[...], head_bias_ref[...]

    def body(i, carry):
        w, valid = _load_rows(w_ref, st, i), _valid_tokens(st, start, i)
        if st.causal and pi_ref is not None:  # Pi from memory: no s, no softmax, no C1
            _, c2, c3 = carry
            pi = pi_ref[0, _tile_slice(st, i), :]  # [block_t, N]
            pw2 = pi[:, :, None] * (w * w)
            run2 = c2[None] + lax.cumsum(pw2, axis=0)
            inv3 = _reciprocal(c3[None] + lax.cumsum(pi, axis=0) + PI_EPS, st.approx)
            y = -pi[:, :, None] * w * _reciprocal(1.0 + run2 * inv3[:, :, None], st.approx)
            carry = (carry[0], c2 + jnp.sum(pw2, axis=0), c3 + jnp.sum(pi, axis=0))
        elif st.causal:
            c1, c2, c3 = carry
            bias = bias_ref[_tile_slice(st, i), :] if bias_ref is not None else None
            f = _causal_tile(w, c1, c2, c3, temp, head_bias, bias, valid, st.approx)
            y = -f["pi"][:, :, None] * w * f["a"]
            carry = (
                c1 + jnp.sum(f["w2"], axis=0),
                c2 + jnp.sum(f["pw2"], axis=0),
                c3 + jnp.sum(f["pi"], axis=0),
            )
        else:
            inv_nu2, a, _ = carry
            if pi_ref is not None:  # Pi from memory: a streaming multiply
                pi = pi_ref[0, _tile_slice(st, i), :]
            else:
                pi = _noncausal_tile(w, inv_nu2, temp, head_bias, valid, st.approx)["pi"]
            y = -pi[:, :, None] * w * a[None]
        y_ref[0, _tile_slice(st, i), :, :] = y.astype(y_ref.dtype)
        return carry

    c1 = c1_ref[0, 0] if st.causal else 1.0 / c1_ref[0, 0]  # non-causal: 1 / nu2, once
    lax.fori_loop(0, st.num_tiles, body, (c1, c2_ref[0, 0], c3_ref[0, 0]))


# --- the causal forward in one pass: a chunked scan with decoupled look-back -----------------
#
# Every statistic of the causal variant is a prefix sum over tokens, so one launch can stream w
# once (Merrill & Garland, "Single-pass Parallel Prefix Scan with Decoupled Look-back", 2016):
# programs take chunks in launch order from an atomic ticket, publish each chunk's local sums
# (its aggregate) as soon as they have them, then walk back over the chunks before theirs,
# adding aggregates until they meet a published inclusive prefix, and publish their own. The
# causal statistics nest (Pi needs the finished prefix of w^2; the moments need Pi), so there
# are two look-backs: one for C1 = sum w^2, then one for (C2, C3) = sums of (Pi w^2, Pi). Each
# chunk is read three times (sums of w^2, Pi, y), the second and third from L2 while the chunk
# is young.
#
# Publishing: the sums go out with atomic adds onto zeroed slots (performed at L2), then a
# barrier of the program's threads, then one scalar atomic raises the slot's flag (AGGREGATE,
# then INCLUSIVE) with release semantics. Reading: the flag with an atomic (acquire), then the
# slot with atomic adds of zero (L2, never a stale L1 line). Triton's compiler crashes on a
# reduction inside a while loop (JAX 0.11.2, seen on the H200), so every spin tests a scalar
# flag only.
#
# Measured on the H200 (bf16, N=8, H=64; benchmarks/NOTES.md): correct, but slower than the
# three launches (0.49 against 0.73 TB/s at T = 262k): the chunks wait on each other, and the
# per-token arithmetic, not the bytes, bounds this variant. So it is opt-in
# (`Config(single_pass=True)`), kept for the next attempt; a chained scan without the window
# was slower still (3.2 us per chunk hop).

AGGREGATE, INCLUSIVE = 1, 2  # a look-back flag: the slot holds the chunk's own / prefix sums


def _slot(ref, index):
    return (index, *(pl.ds(0, n) for n in ref.shape[1:]))


def _atomic_read(ref, index):
    """ref[index] read at GPU scope (an atomic add of zero): never a stale L1 line."""
    return pltriton.atomic_add(ref, _slot(ref, index), jnp.zeros(ref.shape[1:], ref.dtype))


def _publish(flag_ref, flag, refs, index, values):
    """refs[i][index] = values[i] (zeroed slots), then flag_ref[index] = flag, in that order."""
    for ref, value in zip(refs, values, strict=True):
        pltriton.atomic_add(ref, _slot(ref, index), value)
    if not interpret_mode():  # interpret mode runs programs one after another
        pltriton.debug_barrier()  # every thread's slot writes before the flag
    pltriton.atomic_max(flag_ref, (index,), jnp.asarray(flag, jnp.int32))


def _read_flag(flag_ref, index):
    """flag_ref[index] read at GPU scope. (Interpret mode cannot discharge a scalar-indexed
    atomic inside a while loop; a one-element slice there is the same value.)"""
    if interpret_mode():
        return pltriton.atomic_add(flag_ref, (pl.ds(index, 1),), jnp.zeros((1,), jnp.int32))[0]
    return pltriton.atomic_add(flag_ref, (index,), jnp.int32(0))


def _wait_for(flag_ref, index, flag):
    """Spins until flag_ref[index] >= flag; returns the flag read (a scalar-only while loop)."""

    def cond(seen):
        return seen < flag

    def body(_):
        return _read_flag(flag_ref, index)

    return lax.while_loop(cond, body, jnp.int32(0))


LOOK_BACK_WINDOW = 8  # predecessors whose aggregates a chunk adds before it waits for a prefix


def _look_back(ticket, first, flag_ref, aggregate_refs, inclusive_refs):
    """The exclusive prefix (a tuple like the refs' slots) of the chunk holding `ticket`.

    Decoupled look-back over at most LOOK_BACK_WINDOW predecessors (waiting for each one's
    aggregate, stopping at an inclusive prefix), then, if none was found, a wait for the
    inclusive prefix just before the window. The walk is a for loop with a fixed trip count
    and each wait a scalar-only while loop: Triton's compiler crashed (segfault, JAX 0.11.2 on
    the H200) on a while loop that also read or combined the vector slots. `first`: the row's
    first chunk (prefix 0; it publishes its inclusive prefix at once)."""
    zeros = tuple(jnp.zeros(r.shape[1:], jnp.float32) for r in aggregate_refs)
    j = ticket  # steps below never cross the row's first chunk (which publishes INCLUSIVE)

    def step(s, carry):
        done, acc = carry
        k = jnp.maximum(j - 1 - s, 0)
        flag = _wait_for(flag_ref, k, AGGREGATE * (1 - done))
        inclusive = tuple(_atomic_read(r, k) for r in inclusive_refs)
        aggregate = tuple(_atomic_read(r, k) for r in aggregate_refs)
        live = done == 0
        acc = tuple(
            jnp.where(live & (flag == INCLUSIVE), a + i, jnp.where(live, a + g, a))
            for a, i, g in zip(acc, inclusive, aggregate, strict=True)
        )
        return jnp.maximum(done, (live & (flag == INCLUSIVE)).astype(jnp.int32)), acc

    done, acc = lax.fori_loop(0, LOOK_BACK_WINDOW, step, (first.astype(jnp.int32), zeros))
    k = jnp.maximum(j - 1 - LOOK_BACK_WINDOW, 0)
    _wait_for(flag_ref, k, INCLUSIVE * (1 - done))
    tail = tuple(_atomic_read(r, k) for r in inclusive_refs)
    return tuple(jnp.where(done == 1, a, a + t) for a, t in zip(acc, tail, strict=True))


def _causal_scan_kernel(
    w_ref,  # [B, Tp, N, H]
    temp_ref,  # [N]
    head_bias_ref,  # [N]: 0 for real heads, -inf for padding
    *rest,
    st: _Static,  # the forward's (causal, chunks walked in ticket order, not by program id)
):
    """One program: one chunk of one batch row, in ticket order (see the section comment).

    rest: bias_ref [Tp, N] (with denom_bias); the aliased state inputs (unused: the outputs
    below are the same buffers); then the outputs: y_ref [B, Tp, N, H]; c1_ref, c2_ref
    [B, chunks, N, H] and c3_ref [B, chunks, N], the sums before each chunk (the backward's
    residuals); ticket_ref [1] int32; look-back flags flag1_ref, flag2_ref [B * chunks] int32;
    slots agg1_ref, inc1_ref, agg2_ref, inc2_ref [B * chunks, N, H] and agg3_ref, inc3_ref
    [B * chunks, N], all zeroed."""
    bias_ref = rest[0] if st.has_bias else None
    outs = rest[-13:]
    y_ref, c1_ref, c2_ref, c3_ref, ticket_ref, flag1_ref, flag2_ref = outs[:7]
    agg1_ref, inc1_ref, agg2_ref, inc2_ref, agg3_ref, inc3_ref = outs[7:]
    ticket = pltriton.atomic_add(ticket_ref, (jnp.int32(0),), jnp.int32(1))
    b, j = ticket // st.num_chunks, ticket % st.num_chunks
    first = j == 0
    start = j * (st.num_tiles * st.block_t)
    temp, head_bias = temp_ref[...], head_bias_ref[...]
    n, h = w_ref.shape[2:]

    def rows(i):
        tokens = pl.ds(pl.multiple_of(start + i * st.block_t, st.block_t), st.block_t)
        return tokens, w_ref[b, tokens, :, :].astype(jnp.float32)  # [block_t, N, H]

    def bias(tokens):
        return bias_ref[tokens, :] if bias_ref is not None else None

    # 1. the chunk's sum of w^2; publish it, look back for C1 before the chunk, publish C1 after.
    def sum_sq(i, acc):
        _, w = rows(i)
        return acc + jnp.sum(w * w, axis=0)

    agg1 = lax.fori_loop(0, st.num_tiles, sum_sq, jnp.zeros((n, h), jnp.float32))
    # (The row's first chunk publishes its inclusive prefix at once: the look-back stops there.)
    _publish(
        flag1_ref,
        AGGREGATE + first.astype(jnp.int32),
        (agg1_ref, inc1_ref),
        ticket,
        (agg1, jnp.where(first, agg1, 0.0)),
    )
    (c1,) = _look_back(ticket, first, flag1_ref, (agg1_ref,), (inc1_ref,))
    _publish(flag1_ref, INCLUSIVE, (inc1_ref,), ticket, (jnp.where(first, 0.0, c1 + agg1),))

    # 2. Pi, and the chunk's sums of Pi w^2 and Pi; the same for (C2, C3).
    def moments(i, carry):
        run1, acc2, acc3 = carry
        tokens, w = rows(i)
        f = _causal_pi(
            w, run1, temp, head_bias, bias(tokens), _valid_tokens(st, start, i), st.approx
        )
        pw2 = f["pi"][:, :, None] * f["w2"]
        return (
            run1 + jnp.sum(f["w2"], axis=0),
            acc2 + jnp.sum(pw2, axis=0),
            acc3 + jnp.sum(f["pi"], axis=0),
        )

    init = (c1, jnp.zeros((n, h), jnp.float32), jnp.zeros((n,), jnp.float32))
    _, agg2, agg3 = lax.fori_loop(0, st.num_tiles, moments, init)
    _publish(
        flag2_ref,
        AGGREGATE + first.astype(jnp.int32),
        (agg2_ref, agg3_ref, inc2_ref, inc3_ref),
        ticket,
        (agg2, agg3, jnp.where(first, agg2, 0.0), jnp.where(first, agg3, 0.0)),
    )
    c2, c3 = _look_back(ticket, first, flag2_ref, (agg2_ref, agg3_ref), (inc2_ref, inc3_ref))
    _publish(
        flag2_ref,
        INCLUSIVE,
        (inc2_ref, inc3_ref),
        ticket,
        (jnp.where(first, 0.0, c2 + agg2), jnp.where(first, 0.0, c3 + agg3)),
    )
    c1_ref[b, j] = c1
    c2_ref[b, j] = c2
    c3_ref[b, j] = c3

    # 3. y, with the running sums rebuilt inside the chunk.
    def out(i, carry):
        run1, run2, run3 = carry
        tokens, w = rows(i)
        valid = _valid_tokens(st, start, i)
        f = _causal_tile(w, run1, run2, run3, temp, head_bias, bias(tokens), valid, st.approx)
        y_ref[b, tokens, :, :] = (-f["pi"][:, :, None] * w * f["a"]).astype(y_ref.dtype)
        return (
            run1 + jnp.sum(f["w2"], axis=0),
            run2 + jnp.sum(f["pw2"], axis=0),
            run3 + jnp.sum(f["pi"], axis=0),
        )

    lax.fori_loop(0, st.num_tiles, out, (c1, c2, c3))


def _causal_scan_forward(w, temperature, head_bias, bias, *, st: _Static, config: Config):
    """y and the per-chunk sums (c1, c2, c3) before each chunk, in one launch."""
    batch, padded_len, n, h = w.shape
    slots = batch * st.num_chunks
    state = [
        jnp.zeros((1,), jnp.int32),  # the ticket counter
        *(jnp.zeros((slots,), jnp.int32) for _ in range(2)),  # look-back flags
        *(jnp.zeros((slots, n, h), jnp.float32) for _ in range(4)),
        *(jnp.zeros((slots, n), jnp.float32) for _ in range(2)),
    ]
    inputs = [w, temperature, head_bias, *([bias] if st.has_bias else []), *state]
    first_state = len(inputs) - len(state)
    out_shape = [
        jax.ShapeDtypeStruct(w.shape, w.dtype),
        _f32(batch, st.num_chunks, n, h),
        _f32(batch, st.num_chunks, n, h),
        _f32(batch, st.num_chunks, n),
        *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state),
    ]
    outs = pl.pallas_call(
        functools.partial(_causal_scan_kernel, st=st),
        grid=(slots,),
        out_shape=out_shape,
        input_output_aliases={first_state + i: 4 + i for i in range(len(state))},
        compiler_params=triton_params(config.num_warps, config.num_stages),
        interpret=interpret_mode(),
        name="tssa_fwd_causal_scan",
    )(*inputs)
    return outs[:4]


def _suffix_in_tile(x):
    """Sums over tokens i >= t inside the tile, x [block_t, ...]: an upper-triangular product.

    Never `total - prefix`: early tokens of a causal sequence carry huge normalisation
    gradients (their running sums are tiny), which that subtraction would cancel into noise.
    """
    n = x.shape[0]
    upper = (
        lax.broadcasted_iota(jnp.int32, (n, n), 0) <= lax.broadcasted_iota(jnp.int32, (n, n), 1)
    ).astype(jnp.float32)  # [t, i] = 1 where i >= t
    if x.ndim == 2:  # [block_t, N]: too narrow for a tensor-core product
        return jnp.sum(upper[:, :, None] * x[None], axis=1)
    flat = x.reshape(n, x.shape[1] * x.shape[2])
    out = jnp.dot(upper, flat, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return out.reshape(x.shape)


def _bwd_moment_kernel(
    w_ref,  # [1, chunk_t, N, H]
    g_ref,  # [1, chunk_t, N, H]: dy
    c1_ref,  # [1, 1, N, H]: nu2 / running sum of w^2 before the chunk
    c2_ref,  # [1, 1, N, H]: unused / running sum of Pi w^2 before the chunk
    c3_ref,  # [1, 1, N]: unused / running sum of Pi before the chunk
    temp_ref,  # [N]
    head_bias_ref,  # [N]
    *rest,  # bias_ref (causal with bias); outputs gm_ref [1, tiles, N, H], gm3_ref [1, tiles, N]
    st: _Static,
):
    """Per-tile sums of the moment gradients.

    Non-causal: dy Pi w (the gradient of m, up to a^2). Causal: dC2 and dC3, the gradients of
    the running moments (their suffix sums are what every earlier token needs)."""
    bias_ref = rest[0] if st.has_bias else None
    gm_ref, gm3_ref = rest[-2:]
    start = _chunk_start(st)
    temp, head_bias = temp_ref[...], head_bias_ref[...]

    def body(i, carry):
        c1, c2, c3 = carry
        w, valid = _load_rows(w_ref, st, i), _valid_tokens(st, start, i)
        g = _load_rows(g_ref, st, i)
        if st.causal:
            bias = bias_ref[_tile_slice(st, i), :] if bias_ref is not None else None
            f = _causal_tile(w, c1, c2, c3, temp, head_bias, bias, valid, st.approx)
            d_run2, d_run3 = _moment_grads(f, w, f["pi"][:, :, None] * f["a"] * g)
            gm_ref[0, i] = jnp.sum(d_run2, axis=0)
            gm3_ref[0, i] = jnp.sum(d_run3, axis=0)
            carry = (
                c1 + jnp.sum(f["w2"], axis=0),
                c2 + jnp.sum(f["pw2"], axis=0),
                c3 + jnp.sum(f["pi"], axis=0),
            )
        else:
            f = _noncausal_tile(w, 1.0 / c1, temp, head_bias, valid, st.approx)
            gm_ref[0, i] = jnp.sum(g * f["pi"][:, :, None] * w, axis=0)
            gm3_ref[0, i] = jnp.zeros(gm3_ref.shape[2:], jnp.float32)
        return carry

    lax.fori_loop(0, st.num_tiles, body, (c1_ref[0, 0], c2_ref[0, 0], c3_ref[0, 0]))


def _bwd_tile(st: _Static, refs, start, i, carry, temp, head_bias):
    """Backward of tile i down to the logits (shared by the logit and dw kernels).

    carry: non-causal (nu2, a, dS2, dS3), constants; causal the running forward sums
    (c1, c2, c3) before the tile. refs: w, dy, bias (or None), and for the causal variant the
    sums of dC2 / dC3 over all tokens after the tile, r2 [1, tiles, N, H] / r3 [1, tiles, N].
    Returns the tile, its forward dict, d logits, d s, d C1 (causal), the partial dw and the
    carry for the next tile.
    """
    w_ref, g_ref, bias_ref, r2_ref, r3_ref = refs
    w, valid = _load_rows(w_ref, st, i), _valid_tokens(st, start, i)
    g = _load_rows(g_ref, st, i)
    if st.causal:
        c1, c2, c3 = carry
        bias = bias_ref[_tile_slice(st, i), :] if bias_ref is not None else None
        f = _causal_tile(w, c1, c2, c3, temp, head_bias, bias, valid, st.approx)
        pag = f["pi"][:, :, None] * f["a"] * g  # [block_t, N, H]
        d_run2, d_run3 = _moment_grads(f, w, pag)
        suffix2 = r2_ref[0, i][None] + _suffix_in_tile(d_run2)  # sum over i >= t of dC2
        suffix3 = r3_ref[0, i][None] + _suffix_in_tile(d_run3)
        d_logit, d_s, d_run1 = _causal_grads(f, w, g, temp, suffix2, suffix3)
        carry = (
            c1 + jnp.sum(f["w2"], axis=0),
            c2 + jnp.sum(f["pw2"], axis=0),
            c3 + jnp.sum(f["pi"], axis=0),
        )
        # dy's direct term, the running-moment term and the logit term (all but d C1's suffix)
        dw = 2.0 * w * (f["pi"][:, :, None] * suffix2 + d_s[:, :, None] * f["inv_denom"]) - pag
        return w, f, d_logit, d_s, d_run1, dw, carry
    nu2, a, d_s2, d_s3 = carry
    inv_nu2 = 1.0 / nu2  # [N, H]
    f = _noncausal_tile(w, inv_nu2, temp, head_bias, valid, st.approx)
    d_pi = jnp.sum(w * (d_s2[None] * w - a[None] * g), axis=-1) + d_s3[None]
    d_logit = f["pi"] * (d_pi - jnp.sum(f["pi"] * d_pi, axis=1, keepdims=True))
    d_s = d_logit * temp[None, :]
    dw = (
        -f["pi"][:, :, None] * a[None] * g
        + 2.0 * f["pi"][:, :, None] * w * d_s2[None]
        + 2.0 * w * d_s[:, :, None] * inv_nu2[None]
    )
    return w, f, d_logit, d_s, None, dw, carry


def _bwd_carry(st: _Static, c1_ref, c2_ref, c3_ref, r2_ref, r3_ref):
    if st.causal:
        return (c1_ref[0, 0], c2_ref[0, 0], c3_ref[0, 0])
    return (c1_ref[0, 0], c2_ref[0, 0], r2_ref[0, 0], r3_ref[0, 0])


def _bwd_logit_kernel(
    w_ref,  # [1, chunk_t, N, H]
    g_ref,  # [1, chunk_t, N, H]: dy
    c1_ref,  # [1, 1, N, H]: nu2 / running sum of w^2 before the chunk
    c2_ref,  # [1, 1, N, H]: a / running sum of Pi w^2 before the chunk
    c3_ref,  # [1, 1, N]: unused / running sum of Pi before the chunk
    r2_ref,  # [1, 1, N, H]: dS2 / [1, tiles, N, H]: sum of dC2 over tokens after each tile
    r3_ref,  # [1, 1, N]: dS3 / [1, tiles, N]: sum of dC3 over tokens after each tile
    temp_ref,  # [N]
    head_bias_ref,  # [N]
    *rest,  # bias_ref (causal, bias); out: gn_ref [1,tiles,N,H], gt_ref [1,tiles,N], ds_ref
    st: _Static,
):
    """Per-tile sums of the normalisation gradient and of d temperature (and d s per token).

    Non-causal gn = sum_t d s_th w_tc^2 (d nu2 = -gn / nu2^2); causal gn = sum_t d C1_tc."""
    bias_ref = rest[0] if st.has_bias else None
    outs = rest[1:] if st.has_bias else rest
    gn_ref, gt_ref = outs[:2]
    ds_ref = outs[2] if st.has_bias else None
    start = _chunk_start(st)
    temp, head_bias = temp_ref[...], head_bias_ref[...]
    refs = (w_ref, g_ref, bias_ref, r2_ref, r3_ref)

    def body(i, carry):
        _, f, d_logit, d_s, d_run1, _, carry = _bwd_tile(st, refs, start, i, carry, temp, head_bias)
        if st.causal:
            gn_ref[0, i] = jnp.sum(d_run1, axis=0)
        else:
            gn_ref[0, i] = jnp.sum(d_s[:, :, None] * f["w2"], axis=0)
        gt_ref[0, i] = jnp.sum(d_logit * f["s"], axis=0)
        if ds_ref is not None:
            ds_ref[0, _tile_slice(st, i), :] = d_s
        return carry

    init = _bwd_carry(st, c1_ref, c2_ref, c3_ref, r2_ref, r3_ref)
    lax.fori_loop(0, st.num_tiles, body, init)


def _bwd_dw_kernel(
    w_ref,  # [1, chunk_t, N, H]
    g_ref,  # [1, chunk_t, N, H]: dy
    c1_ref,  # [1, 1, N, H]: nu2 / running sum of w^2 before the chunk
    c2_ref,  # [1, 1, N, H]: a / running sum of Pi w^2 before the chunk
    c3_ref,  # [1, 1, N]: unused / running sum of Pi before the chunk
    r2_ref,  # [1, 1, N, H]: dS2 / [1, tiles, N, H]: sum of dC2 over tokens after each tile
    r3_ref,  # [1, 1, N]: dS3 / [1, tiles, N]: sum of dC3 over tokens after each tile
    r1_ref,  # [1, 1, N, H]: d nu2 / [1, tiles, N, H]: sum of dC1 over tokens after each tile
    temp_ref,  # [N]
    head_bias_ref,  # [N]
    *rest,  # bias_ref (causal, bias); out: dw_ref [1, chunk_t, N, H]
    st: _Static,
):
    bias_ref = rest[0] if st.has_bias else None
    dw_ref = rest[-1]
    start = _chunk_start(st)
    temp, head_bias = temp_ref[...], head_bias_ref[...]
    refs = (w_ref, g_ref, bias_ref, r2_ref, r3_ref)

    def body(i, carry):
        w, _, _, _, d_run1, dw, carry = _bwd_tile(st, refs, start, i, carry, temp, head_bias)
        if st.causal:
            dw = dw + 2.0 * w * (r1_ref[0, i][None] + _suffix_in_tile(d_run1))
        else:
            dw = dw + 2.0 * w * r1_ref[0, 0][None]
        dw_ref[0, _tile_slice(st, i), :, :] = dw.astype(dw_ref.dtype)
        return carry

    init = _bwd_carry(st, c1_ref, c2_ref, c3_ref, r2_ref, r3_ref)
    lax.fori_loop(0, st.num_tiles, body, init)


# --- pallas_call wrappers ------------------------------------------------------------------


def _specs(st: _Static, shape, chunk_t: int):
    """BlockSpec builders for one call (grid (B, num_chunks), chunks maybe reversed)."""
    _, _, n, h = shape

    def chunk(j):
        return st.num_chunks - 1 - j if st.reverse else j

    rows = pl.BlockSpec((1, chunk_t, n, h), lambda b, j: (b, chunk(j), 0, 0))
    per_chunk = pl.BlockSpec((1, 1, n, h), lambda b, j: (b, chunk(j), 0, 0))
    per_chunk_head = pl.BlockSpec((1, 1, n), lambda b, j: (b, chunk(j), 0))
    head = pl.BlockSpec((n,), lambda b, j: (0,))
    bias = pl.BlockSpec((chunk_t, n), lambda b, j: (chunk(j), 0))
    token_head = pl.BlockSpec((1, chunk_t, n), lambda b, j: (b, chunk(j), 0))
    tiles = st.num_tiles
    per_tile = pl.BlockSpec((1, tiles, n, h), lambda b, j: (b, chunk(j), 0, 0))
    per_tile_head = pl.BlockSpec((1, tiles, n), lambda b, j: (b, chunk(j), 0))
    if st.causal:
        state, state_head = per_chunk, per_chunk_head
        suffix, suffix_head = per_tile, per_tile_head
    else:  # one global state per batch element
        state = pl.BlockSpec((1, 1, n, h), lambda b, j: (b, 0, 0, 0))
        state_head = pl.BlockSpec((1, 1, n), lambda b, j: (b, 0, 0))
        suffix, suffix_head = state, state_head
    return dict(
        per_tile=per_tile,
        per_tile_head=per_tile_head,
        suffix=suffix,
        suffix_head=suffix_head,
        rows=rows,
        per_chunk=per_chunk,
        per_chunk_head=per_chunk_head,
        state=state,
        state_head=state_head,
        head=head,
        bias=bias,
        token_head=token_head,
    )


def _call(kernel, st: _Static, config: Config, shape, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(
        functools.partial(kernel, st=st),
        grid=(shape[0], st.num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_params(config.num_warps, config.num_stages),
        interpret=interpret_mode(),
        name=name,
    )


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _exclusive_scan(x):
    """Sums over the entries before each one along axis 1 (the chunks), by a shift, never
    `cumsum - x`: a NaN or inf in a chunk must not reach the chunks before it (NaN - NaN)."""
    inclusive = jnp.cumsum(x, axis=1)
    return jnp.concatenate([jnp.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], axis=1)


def _after_scan(x):
    """Sums over the entries after each one along axis 1 (summed from the end, exact order)."""
    inclusive = jnp.flip(jnp.cumsum(jnp.flip(x, axis=1), axis=1), axis=1)
    return jnp.concatenate([inclusive[:, 1:], jnp.zeros_like(inclusive[:, :1])], axis=1)


@dataclasses.dataclass(frozen=True)
class _Passes:
    """The static parameters of every launch of one TSSA call (`_passes`)."""

    store_pi: bool
    forward: _Static  # the first and last forward passes
    middle: _Static  # the forward's middle pass (maybe reversed)
    backward: _Static  # the backward's moment and dw passes: its own tile, the same chunks
    backward_middle: _Static  # the backward's logit pass
    fwd_config: Config  # the forward's warps
    bwd_config: Config  # the backward's warps


def _passes(*, causal: bool, has_bias: bool, seq_len: int, tile: _Tiling, config: Config):
    """Resolve `config`'s defaults (Pi stored for causal; the forward on FORWARD_WARPS, the
    backward on BACKWARD_WARPS, half that for causal) into the `_Static` of each pass."""
    statics = dict(
        causal=causal,
        has_bias=has_bias,
        seq_len=seq_len,
        block_t=tile.block_t,
        num_tiles=tile.chunk_t // tile.block_t,
        num_chunks=tile.num_chunks,
        approx=config.approx_reciprocal,
    )
    store_pi = causal if config.store_pi is None else config.store_pi
    forward = _Static(**statics, reverse=False, store_pi=store_pi)
    middle = _Static(**statics, reverse=config.reverse_middle_pass, store_pi=store_pi)
    backward_tiles = dict(
        block_t=tile.backward_block_t, num_tiles=tile.chunk_t // tile.backward_block_t
    )
    backward_warps = (config.num_warps or BACKWARD_WARPS) // (2 if causal else 1)
    return _Passes(
        store_pi=store_pi,
        forward=forward,
        middle=middle,
        backward=dataclasses.replace(forward, **backward_tiles),
        backward_middle=dataclasses.replace(middle, **backward_tiles),
        fwd_config=dataclasses.replace(config, num_warps=config.num_warps or FORWARD_WARPS),
        bwd_config=dataclasses.replace(
            config, num_warps=config.backward_num_warps or max(1, backward_warps)
        ),
    )


@functools.cache
def _make_tssa(
    *, causal: bool, has_bias: bool, seq_len: int, num_heads: int, tile: _Tiling, config: Config
):
    """The custom_vjp TSSA on padded inputs (w [B, Tp, Np, Hp], temperature [Np], bias [Tp, Np]).

    `bias` is H * denom_bias^T (a dummy when has_bias is False); padded heads >= num_heads."""
    p = _passes(causal=causal, has_bias=has_bias, seq_len=seq_len, tile=tile, config=config)
    store_pi, forward_st, middle_st = p.store_pi, p.forward, p.middle
    backward_st, backward_middle_st, backward_config = p.backward, p.backward_middle, p.bwd_config
    config = p.fwd_config

    def head_bias(n_pad):
        return jnp.where(jnp.arange(n_pad) < num_heads, 0.0, -jnp.inf).astype(jnp.float32)

    def bias_args(st, w_shape, bias):
        return ([_specs(st, w_shape, tile.chunk_t)["bias"]], [bias]) if has_bias else ([], [])

    def forward(w, temperature, bias):
        b, _, n, h = w.shape
        nc = tile.num_chunks
        hb = head_bias(n)
        if causal and config.single_pass:
            y, c1, c2, c3 = _causal_scan_forward(
                w, temperature, hb, bias, st=forward_st, config=config
            )
            return y, (c1, c2, c3, None)
        sp = _specs(forward_st, w.shape, tile.chunk_t)
        s1 = _call(
            _fwd_sq_kernel,
            forward_st,
            config,
            w.shape,
            [sp["rows"]],
            sp["per_chunk"],
            _f32(b, nc, n, h),
            "tssa_fwd_sq",
        )(w)
        if causal:
            c1 = _exclusive_scan(s1)
        else:
            total1 = jnp.sum(s1, axis=1, keepdims=True)
            c1 = jnp.where(total1 > NORM_EPS_SQ, total1, NORM_EPS_SQ)  # nu2
        sp = _specs(middle_st, w.shape, tile.chunk_t)
        b_specs, b_args = bias_args(middle_st, w.shape, bias)
        pi_specs, pi_shapes = ([sp["token_head"]], [_f32(b, tile.padded_len, n)])
        s2, s3, *pi = _call(
            _fwd_pi_kernel,
            middle_st,
            config,
            w.shape,
            [sp["rows"], sp["state"], sp["head"], sp["head"], *b_specs],
            [sp["per_chunk"], sp["per_chunk_head"], *(pi_specs if store_pi else [])],
            [_f32(b, nc, n, h), _f32(b, nc, n), *(pi_shapes if store_pi else [])],
            "tssa_fwd_pi",
        )(w, c1, temperature, hb, *b_args)
        if causal:
            c2, c3 = _exclusive_scan(s2), _exclusive_scan(s3)
        else:
            total2 = jnp.sum(s2, axis=1, keepdims=True)
            total3 = jnp.sum(s3, axis=1, keepdims=True)
            c2 = 1.0 / (1.0 + total2 / (total3[..., None] + PI_EPS))  # a = 1 / (1 + m)
            c3 = total3
        sp = _specs(forward_st, w.shape, tile.chunk_t)
        b_specs, b_args = bias_args(forward_st, w.shape, bias)
        y = _call(
            _fwd_out_kernel,
            forward_st,
            config,
            w.shape,
            [sp["rows"], sp["state"], sp["state"], sp["state_head"], sp["head"], sp["head"]]
            + b_specs
            + ([sp["token_head"]] if store_pi else []),
            sp["rows"],
            jax.ShapeDtypeStruct(w.shape, w.dtype),
            "tssa_fwd_out",
        )(w, c1, c2, c3, temperature, hb, *b_args, *pi)
        stats = (c1, c2, c3, s2 if not causal else None)
        return y, stats

    @jax.custom_vjp
    def tssa(w, temperature, bias):
        return forward(w, temperature, bias)[0]

    def tssa_fwd(w, temperature, bias):
        y, stats = forward(w, temperature, bias)
        return y, (w, temperature, bias, stats)

    def tssa_bwd(res, g):
        w, temperature, bias, (c1, c2, c3, s2) = res
        b, _, n, h = w.shape
        num_tiles = tile.padded_len // tile.backward_block_t
        hb = head_bias(n)
        per_tile_shape = [_f32(b, num_tiles, n, h), _f32(b, num_tiles, n)]
        sp = _specs(backward_st, w.shape, tile.chunk_t)
        b_specs, b_args = bias_args(backward_st, w.shape, bias)
        gm, gm3 = _call(
            _bwd_moment_kernel,
            backward_st,
            backward_config,
            w.shape,
            [sp["rows"], sp["rows"], sp["state"], sp["state"], sp["state_head"]]
            + [sp["head"], sp["head"], *b_specs],
            [sp["per_tile"], sp["per_tile_head"]],
            per_tile_shape,
            "tssa_bwd_moment",
        )(w, g, c1, c2, c3, temperature, hb, *b_args)
        if causal:
            r2, r3 = _after_scan(gm), _after_scan(gm3)
        else:
            a, inv3 = c2, 1.0 / (c3 + PI_EPS)  # [B, 1, N, H], [B, 1, N]
            d_m = a * a * jnp.sum(gm, axis=1, keepdims=True)
            r2 = d_m * inv3[..., None]  # dS2
            r3 = -jnp.sum(d_m * s2.sum(axis=1, keepdims=True), axis=-1) * inv3 * inv3  # dS3
        sp = _specs(backward_middle_st, w.shape, tile.chunk_t)
        b_specs, b_args = bias_args(backward_middle_st, w.shape, bias)
        out_specs = [sp["per_tile"], sp["per_tile_head"]]
        out_shape = list(per_tile_shape)
        if has_bias:
            out_specs.append(sp["token_head"])
            out_shape.append(_f32(b, tile.padded_len, n))
        outs = _call(
            _bwd_logit_kernel,
            backward_middle_st,
            backward_config,
            w.shape,
            [sp["rows"], sp["rows"], sp["state"], sp["state"], sp["state_head"]]
            + [sp["suffix"], sp["suffix_head"], sp["head"], sp["head"], *b_specs],
            out_specs,
            out_shape,
            "tssa_bwd_logit",
        )(w, g, c1, c2, c3, r2, r3, temperature, hb, *b_args)
        gn, gt = outs[:2]
        if causal:
            r1 = _after_scan(gn)
        else:
            nu2 = c1
            r1 = jnp.where(nu2 > NORM_EPS_SQ, -jnp.sum(gn, axis=1, keepdims=True) / (nu2 * nu2), 0)
        sp = _specs(backward_st, w.shape, tile.chunk_t)
        b_specs, b_args = bias_args(backward_st, w.shape, bias)
        dw = _call(
            _bwd_dw_kernel,
            backward_st,
            backward_config,
            w.shape,
            [sp["rows"], sp["rows"], sp["state"], sp["state"], sp["state_head"]]
            + [sp["suffix"], sp["suffix_head"], sp["suffix"], sp["head"], sp["head"], *b_specs],
            sp["rows"],
            jax.ShapeDtypeStruct(w.shape, w.dtype),
            "tssa_bwd_dw",
        )(w, g, c1, c2, c3, r2, r3, r1, temperature, hb, *b_args)
        d_temp = jnp.sum(gt, axis=(0, 1)).astype(temperature.dtype)
        d_bias = jnp.sum(outs[2], axis=0).astype(bias.dtype) if has_bias else jnp.zeros_like(bias)
        return dw, d_temp, d_bias

    tssa.defvjp(tssa_fwd, tssa_bwd)
    return tssa


def token_statistics_attention(
    w: jax.Array,  # [B, T, N, H]
    temperature: jax.Array,  # [N]
    *,
    causal: bool = False,
    denom_bias: jax.Array | None = None,  # [N, L], L >= T (causal only)
    config: Config | None = None,
) -> jax.Array:  # [B, T, N, H]
    """TSSA through the fused kernels; differentiable in w, temperature and denom_bias."""
    config = config or Config()
    batch, seq_len, num_heads, head_dim = w.shape
    n_pad, h_pad = _pow2_ceil(num_heads), _pow2_ceil(head_dim)
    tile = tiling(batch, seq_len, n_pad * h_pad, config, causal)
    pads = [(0, 0), (0, tile.padded_len - seq_len), (0, n_pad - num_heads), (0, h_pad - head_dim)]
    w_p = jnp.pad(w, pads) if any(p[1] for p in pads) else w
    temp_p = jnp.pad(temperature.astype(jnp.float32), (0, n_pad - num_heads))
    has_bias = causal and denom_bias is not None
    if has_bias:
        bias = head_dim * denom_bias[:, :seq_len].astype(jnp.float32).T  # [T, N]
        bias = jnp.pad(bias, [(0, tile.padded_len - seq_len), (0, n_pad - num_heads)])
    else:
        bias = jnp.zeros((1, n_pad), jnp.float32)
    fn = _make_tssa(
        causal=causal,
        has_bias=has_bias,
        seq_len=seq_len,
        num_heads=num_heads,
        tile=tile,
        config=config,
    )
    y = fn(w_p, temp_p, bias)
    return y[:, :seq_len, :num_heads, :head_dim]
