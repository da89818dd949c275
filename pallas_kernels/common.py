"""What the Pallas kernels share: where they run, padding, and Triton compiler parameters.

Every kernel here runs compiled on a CUDA GPU and in Pallas interpret mode anywhere else (CPU
tests and CI). `interpret_mode()` is the one place that decides.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton


def check_config_fields(
    config,
    *,
    ints: tuple[str, ...] = (),
    powers_of_two: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    minimum: int = 1,
) -> None:
    """Validate a kernel Config at construction (its `__post_init__`), so a bad field fails here
    and not as a ZeroDivisionError deep in a kernel: `ints` (and `powers_of_two`) must be ints,
    not bools, >= minimum; `bools` must be bools; fields in `optional` may also be None."""
    kind = type(config).__name__
    for name in ints + powers_of_two + bools:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if name in bools:
            if not isinstance(value, bool):
                raise ValueError(f"{kind}.{name} must be a bool, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{kind}.{name} must be an int, got {value!r}")
        if value < minimum:
            raise ValueError(f"{kind}.{name} must be >= {minimum}, got {value}")
        if name in powers_of_two and value & (value - 1):
            raise ValueError(f"{kind}.{name} must be a power of two, got {value}")


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def interpret_mode() -> bool:
    """Run Pallas kernels in interpret mode: everywhere except on a GPU."""
    return not on_gpu()


def triton_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    """Triton compiler parameters (ignored in interpret mode)."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def padded_head_dim(head_dim: int) -> int:
    """The head dim a Triton kernel computes with: the next power of two, at least 16.

    Triton tiles need power-of-two extents and tensor-core dots need >= 16; zero columns add
    nothing to q.k or to p.v, so padding H changes no result.
    """
    return max(16, 1 << (head_dim - 1).bit_length())


def pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad axis `axis` of x at the end to `size` with `value` (no copy when it already fits)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pad_last(x: jax.Array, size: int) -> jax.Array:
    """Zero-pad the last axis of x to `size`."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


# --- masks and score modifiers shared by the flash kernels ----------------------------------
#
# Everything below works on traced int32 scalars and index vectors inside a kernel (Triton or
# Mosaic GPU), so each kernel builds the mask of one tile and never holds a [T, S] matrix.
# Visibility of key j from query i (absolute position i + q_offset):
#   causal:           j <= i + q_offset
#   window (L, R):    i + q_offset - L <= j <= i + q_offset + R
#   lengths:          i < q_len, j < kv_len
#   segments:         q_seg[i] == kv_seg[j]


def right_reach(is_causal: bool, window: tuple[int, int] | None) -> int | None:
    """How far right of the diagonal a query sees (None: unbounded)."""
    reach = 0 if is_causal else None
    if window is not None:
        reach = window[1] if reach is None else min(reach, window[1])
    return reach


def left_reach(window: tuple[int, int] | None) -> int | None:
    """How far left of the diagonal a query sees (None: unbounded)."""
    return None if window is None else window[0]


def idiv(a, b: int):
    """`lax.div(a, b)` for a traced integer a and a static b (a // b for a >= 0): b takes a's
    dtype, so kernels also trace with `jax_enable_x64`, where a Python int would be int64 and
    lax.div refuses to mix the two."""
    a = jnp.asarray(a)
    return jax.lax.div(a, jnp.asarray(b, a.dtype))


def irem(a, b: int):
    """`lax.rem(a, b)` for a traced integer a and a static b, x64-safe as `idiv`."""
    a = jnp.asarray(a)
    return jax.lax.rem(a, jnp.asarray(b, a.dtype))


def _ceil_div(a, b: int):
    return idiv(a + (b - 1), b)


def key_block_range(
    q_first, q_stop, *, q_offset, kv_len, block_k: int, right: int | None, left: int | None
):
    """[lo, hi) of the key blocks that queries [q_first, q_stop) can see (empty when q_stop <=
    q_first). Blocks outside are hidden entirely by causal, window or length masks: skip them."""
    key_stop = kv_len
    if right is not None:
        key_stop = jnp.minimum(key_stop, q_stop - 1 + q_offset + right + 1)
    key_start = jnp.zeros_like(kv_len)
    if left is not None:
        key_start = jnp.maximum(key_start, q_first + q_offset - left)
    lo = idiv(key_start, block_k)
    hi = _ceil_div(jnp.maximum(key_stop, 0), block_k)
    hi = jnp.where(q_stop > q_first, jnp.maximum(hi, lo), lo)
    return lo, hi


def query_block_range(
    k_first, k_stop, *, q_offset, q_len, block_q: int, right: int | None, left: int | None
):
    """[lo, hi) of the query blocks that can see keys [k_first, k_stop) (empty when k_stop <=
    k_first)."""
    query_start = jnp.zeros_like(q_len)
    if right is not None:
        query_start = jnp.maximum(query_start, k_first - q_offset - right)
    query_stop = q_len
    if left is not None:
        query_stop = jnp.minimum(query_stop, k_stop - 1 - q_offset + left + 1)
    lo = idiv(query_start, block_q)
    hi = _ceil_div(jnp.maximum(query_stop, 0), block_q)
    hi = jnp.where(k_stop > k_first, jnp.maximum(hi, lo), lo)
    return lo, hi


def tile_visibility(
    q_pos: jax.Array,  # [block_q] int32 query rows
    k_pos: jax.Array,  # [block_k] int32 key columns
    *,
    q_offset,
    q_len,
    kv_len,
    right: int | None,
    left: int | None,
    check_q_len: bool,
    check_kv_len: bool,
    q_seg: jax.Array | None = None,  # [block_q]
    kv_seg: jax.Array | None = None,  # [block_k]
    broadcast: bool = True,
) -> jax.Array | None:  # [block_q, block_k] bool, or None when every key is visible
    """Which keys of a tile each query sees (None: all of them, so no mask is applied).

    broadcast=False takes q_pos, k_pos, q_seg, kv_seg already as [block_q, block_k] grids (the
    Mosaic GPU kernel builds them in its wgmma register layout)."""
    visible = None

    def both(a, b):
        return b if a is None else a & b

    def rows(x):
        return x[:, None] if broadcast else x

    def cols(x):
        return x[None, :] if broadcast else x

    if right is not None or left is not None:
        q_abs = rows(q_pos) + q_offset  # [block_q, 1]
        k_abs = cols(k_pos)  # [1, block_k]
        if right is not None:
            visible = both(visible, k_abs <= q_abs + right)
        if left is not None:
            visible = both(visible, k_abs >= q_abs - left)
    if check_kv_len:
        visible = both(visible, cols(k_pos) < kv_len)
    if check_q_len:
        visible = both(visible, rows(q_pos) < q_len)
    if q_seg is not None:
        visible = both(visible, rows(q_seg) == cols(kv_seg))
    return visible


def capped_logits(scores: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(scores / cap)`, identity when cap is None (float32 in, float32 out)."""
    if cap is None:
        return scores
    return cap * jnp.tanh(scores / cap)


def capped_logits_grad(scores: jax.Array, cap: float | None) -> jax.Array | float:
    """d capped_logits / d scores."""
    if cap is None:
        return 1.0
    tanh = jnp.tanh(scores / cap)
    return 1.0 - tanh * tanh


def clip_inner(lo, hi, inner_lo, inner_hi):
    """Clip [inner_lo, inner_hi) into [lo, hi), so that the three ranges [lo, inner_lo),
    [inner_lo, inner_hi) and [inner_hi, hi) cover [lo, hi) exactly."""
    inner_lo = jnp.clip(inner_lo, lo, hi)
    return inner_lo, jnp.clip(inner_hi, inner_lo, hi)


def unmasked_key_blocks(
    lo,
    hi,
    q_first,
    *,
    q_offset,
    q_len,
    kv_len,
    block_q: int,
    block_k: int,
    right: int | None,
    left: int | None,
    check_q_len: bool,
    check_kv_len: bool,
):
    """The part of the key blocks [lo, hi) that every query of [q_first, q_first + block_q)
    sees in full under the causal, window and length masks: those tiles need no mask at all."""
    q_last = q_first + block_q - 1
    inner_lo, inner_hi = lo, hi
    if left is not None:  # key block start >= q_last + q_offset - left
        inner_lo = _ceil_div(jnp.maximum(q_last + q_offset - left, 0), block_k)
    if right is not None:  # key block end - 1 <= q_first + q_offset + right
        inner_hi = idiv(jnp.maximum(q_first + q_offset + right + 1, 0), block_k)
    if check_kv_len:
        inner_hi = jnp.minimum(inner_hi, idiv(kv_len, block_k))
    if check_q_len:  # a block with rows past q_len masks every tile
        inner_hi = jnp.where(q_first + block_q <= q_len, inner_hi, inner_lo)
    return clip_inner(lo, hi, inner_lo, inner_hi)


def unmasked_query_blocks(
    lo,
    hi,
    k_first,
    *,
    q_offset,
    q_len,
    kv_len,
    block_q: int,
    block_k: int,
    right: int | None,
    left: int | None,
    check_q_len: bool,
    check_kv_len: bool,
):
    """The part of the query blocks [lo, hi) whose every query sees all keys of
    [k_first, k_first + block_k) under the causal, window and length masks."""
    k_last = k_first + block_k - 1
    inner_lo, inner_hi = lo, hi
    if right is not None:  # query block start + q_offset + right >= k_last
        inner_lo = _ceil_div(jnp.maximum(k_last - q_offset - right, 0), block_q)
    if left is not None:  # query block end - 1 + q_offset - left <= k_first
        inner_hi = idiv(jnp.maximum(k_first - q_offset + left + 1, 0), block_q)
    if check_q_len:
        inner_hi = jnp.minimum(inner_hi, idiv(q_len, block_q))
    if check_kv_len:  # a key block with keys past kv_len masks every tile
        inner_hi = jnp.where(k_first + block_k <= kv_len, inner_hi, inner_lo)
    return clip_inner(lo, hi, inner_lo, inner_hi)


def visit_all(st, ranges, visit, carry, unmasked=None, structural=None):
    """Run visit(j, carry, masked) over [lo, hi): masked tiles at the edges, unmasked inside.

    `st` says which masks exist (right, left, check_q_len, check_kv_len, dense_masks).
    Splitting the loop keeps the mask arithmetic off the tiles that every query sees in full
    (the bulk of causal and windowed attention). `unmasked(first, end, carry)`, if given, runs
    the unmasked range [first, end) in place of the loop of visit(j, carry, masked=False).
    `structural`: True keeps the three ranges whatever `st` says (a flex block mask's lists)."""
    lo, inner_lo, inner_hi, hi = ranges
    if structural is None:
        structural = (
            st.right is not None or st.left is not None or st.check_q_len or st.check_kv_len
        )

    def loop(first, end, carry, masked):
        if not masked and unmasked is not None:
            return unmasked(first, end, carry)
        return jax.lax.fori_loop(first, end, functools.partial(visit, masked=masked), carry)

    if st.dense_masks:
        return loop(lo, hi, carry, True)
    if not structural:
        return loop(lo, hi, carry, False)
    carry = loop(lo, inner_lo, carry, True)
    carry = loop(inner_lo, inner_hi, carry, False)
    return loop(inner_hi, hi, carry, True)


# Shared memory per thread block by compute capability (CUDA's opt-in maximum, in bytes).
_SHARED_MEMORY = {(9, 0): 227 * 1024, (8, 0): 163 * 1024, (8, 7): 163 * 1024}
_SHARED_MEMORY_DEFAULT = 99 * 1024  # sm_86 / sm_89 (consumer Ampere, Ada)


def shared_memory_bytes() -> int | None:
    """The shared memory a kernel may use on this GPU (None off the GPU: interpret mode)."""
    if not on_gpu():
        return None
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    major, minor = (int(part) for part in str(capability).split(".")[:2])
    if major >= 9:
        return _SHARED_MEMORY[(9, 0)]
    return _SHARED_MEMORY.get((major, minor), _SHARED_MEMORY_DEFAULT)


# --- user score / mask modifiers (jattn.flex_attention) ----------------------------------------


def score_mod_tile(score_mod, scores: jax.Array, b, h, q_idx, k_idx, consts=()) -> jax.Array:
    """A scalar `score_mod(score, b, h, q_idx, kv_idx, *consts)` over a tile: scores
    [bq, bk] float32, q_idx [bq], k_idx [bk] int32; vmapped, so any jnp op works."""

    def one(score, q, k):
        return score_mod(score, b, h, q, k, *consts)

    tile = jax.vmap(jax.vmap(one, in_axes=(0, None, 0)), in_axes=(0, 0, None))
    return jnp.broadcast_to(jnp.asarray(tile(scores, q_idx, k_idx)), scores.shape).astype(
        scores.dtype
    )


def mask_mod_tile(mask_mod, b, h, q_idx, k_idx, consts=()) -> jax.Array:
    """A scalar `mask_mod(b, h, q_idx, kv_idx, *consts) -> bool` over a tile: [bq, bk] bool."""

    def one(q, k):
        return mask_mod(b, h, q, k, *consts)

    tile = jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))
    visible = jnp.asarray(tile(q_idx, k_idx)).astype(bool)
    return jnp.broadcast_to(visible, (q_idx.shape[0], k_idx.shape[0]))


class ConstRef:
    """An array a user mod closes over, held in a kernel as a flat input Ref: jattn.flex's
    interpreter turns the mod's element reads (dynamic_slice, point gathers) into loads
    `take(linear index)` (Triton lowers no gather), and loads it whole for anything else."""

    def __init__(self, ref, shape: tuple[int, ...]):
        self.ref, self.shape = ref, tuple(shape)

    def load(self) -> jax.Array:
        return self.ref[...].reshape(self.shape)

    def take(self, linear: jax.Array) -> jax.Array:
        return self.ref[linear]


class ReadTape:
    """The element reads of a mod's consts, in order: where (flat index), from which const,
    and the values read; or, given `values`, the values to return instead (a replay, whose
    vjp gives each read's cotangent)."""

    def __init__(self, values=None):
        self.indices, self.sources, self.values = [], [], []
        self.replay = values

    def read(self, const: TapedConstRef, linear: jax.Array) -> jax.Array:
        self.indices.append(linear)
        self.sources.append(const.source)
        if self.replay is not None:
            return self.replay[len(self.indices) - 1]
        value = const.ref[linear]
        self.values.append(value)
        return value


class TapedConstRef(ConstRef):
    """A ConstRef whose reads go through a ReadTape (a differentiated const): a whole load is
    a read of every element."""

    def __init__(self, const: ConstRef, tape: ReadTape, source: int):
        super().__init__(const.ref, const.shape)
        self.tape, self.source = tape, source

    def take(self, linear: jax.Array) -> jax.Array:
        return self.tape.read(self, linear)

    def load(self) -> jax.Array:
        size = math.prod(self.shape)
        return self.take(jnp.arange(size, dtype=jnp.int32)).reshape(self.shape)
