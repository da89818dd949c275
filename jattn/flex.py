"""Generated attention variants: `flex_attention` with a score_mod and a mask_mod.

FlexAttention's API (PyTorch; FlashAttention-4 has the same) in jattn's `[B, T, N, H]` layout:
a variant outside `dot_product_attention`'s options (ALiBi, T5 relative bias, prefix-LM, document
masks, dilated windows, sink tokens) is two scalar functions, not a dense `[B, N, T, S]` bias:

    score_mod(score, b, h, q_idx, kv_idx) -> score   # scale * q.k of one pair, any jnp ops
    mask_mod(b, h, q_idx, kv_idx) -> bool            # True = attend

Both are vectorised with `jax.vmap`, so they are written for scalars and may use any jnp op,
`jnp.where`, `lax.cond` and indexing; they may close over arrays (an ALiBi slope vector, a
learnable bias table, document ids), whose gradients are computed too. `b` is the batch row,
`h` the query head (GQA: kv head `h // (N // K)`), `q_idx` in [0, T), `kv_idx` in [0, S).

`create_block_mask(mask_mod, B, N, T, S)` records, per (batch, head, query block), which key
blocks the mask leaves empty (the kernel never loads them), full (no mask arithmetic) or
partial (mask_mod evaluated per element). Build it once (under jit or not) and reuse it across
layers and steps; it is a pytree.

Implementations: 'xla' evaluates both mods densely (`[B, N, T, S]`, the reference: any dtype,
differentiable to any order by JAX itself); 'triton' traces them into the Triton flash kernel
(CPU: Pallas interpret mode), forward and backward; 'mosaic' traces them into the Mosaic GPU
kernels (Hopper; float16/bfloat16, block masks of 128 query rows; closed-over arrays only read
as one integer or bool value per query row and one per key, such as document ids, which are
computed outside the kernels, `_mosaic_vectors`; the backward visits the block mask's lists too
where its key blocks are a multiple of its dk/dv programs' keys, else it is the Triton
kernel's; mods are checked against Mosaic GPU's lowering rules first,
`mosaic_common.flex_unlowered`). None picks 'mosaic' on Hopper where it serves the call, else
'triton', on a GPU, and 'xla' elsewhere (`_auto_order`). Semantics are
`jattn.dot_product_attention`'s: a query row that sees no key gives output 0, lse -inf and
zero gradients, never NaN; a key holding NaN/inf reaches only the rows that see it (not yet on
'mosaic': there a hidden key's NaN reaches the other rows of its tile, as
`jattn.dot_product_attention` notes).

How the mods reach the kernel: each is traced once to a jaxpr on scalars; every array it
closes over becomes a kernel input that stays in memory, and `_eval_mod` evaluates the jaxpr
inside the kernel (vmapped over the tile), turning element reads of those arrays (`x[i]`,
`table[bucket, h]`: dynamic_slice or gather, which Triton does not lower) into loads, indices
clamped into range. The score_mod's derivative is jax.vjp of the tile function in the dq and
dk/dv kernels; a closed-over float array that is differentiated has its reads recorded and
each read's cotangent added at its index (atomics on the GPU) into a per-program gradient,
summed after. Limits: 'triton' serves float16/bfloat16/float32 (float64: 'xla'); first-order
reverse mode only; with a block mask its blocks are the kernel's tiles (powers of two >= 16);
mods run on float32 scores; eager calls re-trace (jit the caller).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from jattn import masking
from jattn.attention import _autodiff_levels, concrete_value

ScoreMod = Callable[..., Any]  # (score, b, h, q_idx, kv_idx) -> score
MaskMod = Callable[..., Any]  # (b, h, q_idx, kv_idx) -> bool

_HIGHEST = lax.Precision.HIGHEST
_IMPLEMENTATIONS = ("xla", "triton", "mosaic")


# --- block mask ----------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Which tiles of the `[T, S]` score matrix a mask_mod leaves empty, full or partial.

    Per (batch b, head h) of `[B', N']` (1 where created with B or N None: it broadcasts) and per
    query block, `kv_blocks[b, h, i]` lists the key blocks to visit: `[n_partial, n_full,
    partial ids (padded to KB), full ids (padded to KB)]`, ids ascending. `q_blocks[b, h, j]` is
    the same per key block (the dk/dv kernel's loop). Positions past T or S count as masked, so a
    block that holds padding is never full.
    """

    kv_blocks: Array  # [B', N', QB, 2 + 2 * KB] int32
    q_blocks: Array  # [B', N', KB, 2 + 2 * QB] int32
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))
    q_len: int = dataclasses.field(metadata=dict(static=True))  # T
    kv_len: int = dataclasses.field(metadata=dict(static=True))  # S
    mask_mod: MaskMod | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B', N', T, S): the batch and head extents it serves (1: any) and the lengths."""
        return (*self.kv_blocks.shape[:2], self.q_len, self.kv_len)

    def to_dense(self) -> Array:
        """`[B', N', QB, KB]` int8 block states: 0 empty, 1 partial, 2 full."""
        num_kv = self.kv_blocks.shape[-1] // 2 - 1
        states = jnp.zeros(self.kv_blocks.shape[:-1] + (num_kv,), jnp.int8)
        for kind, value in ((0, 1), (1, 2)):
            count = self.kv_blocks[..., kind]
            ids = self.kv_blocks[..., 2 + kind * num_kv : 2 + (kind + 1) * num_kv]
            entry = jnp.arange(num_kv).reshape((1,) * count.ndim + (num_kv,))
            listed = entry < count[..., None]  # [..., KB]: entry t in use
            hits = (ids[..., :, None] == entry[..., None, :]) & listed[..., :, None]
            states = jnp.where(jnp.any(hits, axis=-2), jnp.int8(value), states)
        return states

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, block_q={self.block_q}, block_kv={self.block_kv}, "
            f"mask_mod={getattr(self.mask_mod, '__name__', self.mask_mod)})"
        )


def _check_length(x, name: str, allow_none: bool) -> int | None:
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {x!r}")
    return int(x)


def _grid(fn: Callable, with_score: bool) -> Callable:
    """fn over scalars -> fn over a grid: args (score?, b, h, q, kv) with b, h, q, kv vectors
    and score `[len(b), len(h), len(q), len(kv)]`, the result's shape."""
    for axis in (3, 2, 1, 0):  # kv innermost
        axes = [None] * 4
        axes[axis] = 0
        fn = jax.vmap(fn, in_axes=((0,) if with_score else ()) + tuple(axes))
    return fn


def _block_lists(any_visible: Array, all_visible: Array) -> Array:
    """[..., R, C] bool -> [..., R, 2 + 2 C] int32: per row, counts then partial and full ids."""
    partial = any_visible & ~all_visible
    order = jnp.arange(partial.shape[-1], dtype=jnp.int32)

    def listed(which):  # ids where `which` first (ascending), then the rest
        ids = jnp.argsort(jnp.where(which, order, order + partial.shape[-1]), axis=-1)
        return ids.astype(jnp.int32)

    counts = jnp.stack([partial.sum(-1), all_visible.sum(-1)], axis=-1).astype(jnp.int32)
    return jnp.concatenate([counts, listed(partial), listed(all_visible)], axis=-1)


def create_block_mask(
    mask_mod: MaskMod,
    B: int | None,  # noqa: N803 (FlexAttention's argument names)
    N: int | None,  # noqa: N803
    T: int,  # noqa: N803
    S: int,  # noqa: N803
    *,
    block_q: int = 128,
    block_kv: int = 128,
) -> BlockMask:
    """Evaluate `mask_mod(b, h, q_idx, kv_idx) -> bool` over `[B, N, T, S]` block by block.

    B or N None: the mask does not depend on it (evaluated at 0, broadcast). Computed on the
    device with jnp (one query block row `[block_q, S]` at a time, so memory is
    O(B N block_q S)); works under jit, where mask_mod may close over traced arrays. The
    result keeps `mask_mod` (static) for `flex_attention(block_mask=...)` without a mask_mod;
    a mask built inside a jit from a mask_mod that closes over that jit's traced arrays keeps
    a mask_mod that cannot run outside it: pass mask_mod to flex_attention there. The Triton
    kernel tiles by these blocks: powers of two >= 16 there, whose pipelines fit the GPU's
    shared memory with one stage at least (on the H200 at H = 128: up to 128 x 128).
    """
    if not callable(mask_mod):
        raise ValueError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    batch = _check_length(B, "B", True)
    heads = _check_length(N, "N", True)
    q_len, kv_len = _check_length(T, "T", False), _check_length(S, "S", False)
    block_q, block_kv = (
        _check_length(block_q, "block_q", False),
        _check_length(block_kv, "block_kv", False),
    )
    num_q, num_kv = -(-q_len // block_q), -(-kv_len // block_kv)
    kv_pos = jnp.arange(num_kv * block_kv, dtype=jnp.int32)
    kv_valid = kv_pos < kv_len
    kv_idx = jnp.minimum(kv_pos, kv_len - 1)  # mods only ever see indices in range
    b_idx = jnp.arange(batch or 1, dtype=jnp.int32)
    h_idx = jnp.arange(heads or 1, dtype=jnp.int32)
    evaluate = _grid(mask_mod, False)

    def row(i):  # query block i: (any, all) visible per key block, [B', N', KB]
        q_pos = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
        visible = evaluate(b_idx, h_idx, jnp.minimum(q_pos, q_len - 1), kv_idx)
        visible = jnp.asarray(visible).astype(bool)
        visible = visible & (q_pos < q_len)[None, None, :, None] & kv_valid[None, None, None]
        visible = visible.reshape(*visible.shape[:3], num_kv, block_kv)
        return jnp.any(visible, axis=(2, 4)), jnp.all(visible, axis=(2, 4))

    any_visible, all_visible = lax.map(row, jnp.arange(num_q, dtype=jnp.int32))
    any_visible = jnp.moveaxis(any_visible, 0, 2)  # [B', N', QB, KB]
    all_visible = jnp.moveaxis(all_visible, 0, 2)
    return BlockMask(
        kv_blocks=_block_lists(any_visible, all_visible),
        q_blocks=_block_lists(jnp.swapaxes(any_visible, 2, 3), jnp.swapaxes(all_visible, 2, 3)),
        block_q=block_q,
        block_kv=block_kv,
        q_len=q_len,
        kv_len=kv_len,
        mask_mod=mask_mod,
    )


# --- argument checks ------------------------------------------------------------------------------


def _check_inputs(query, key, value, score_mod, mask_mod, block_mask, implementation):
    shapes = f"query {tuple(jnp.shape(query))}, key {tuple(jnp.shape(key))}, value " + str(
        tuple(jnp.shape(value))
    )
    if any(jnp.ndim(x) != 4 for x in (query, key, value)):
        raise ValueError(
            "flex_attention takes query [B, T, N, H] and key, value [B, S, K, H], got " + shapes
        )
    batch, q_len, num_heads, head_dim = query.shape
    if key.shape != value.shape or key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError("key and value must be [B, S, K, H] with query's B and H, got " + shapes)
    num_kv_heads = key.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"query heads N must be a multiple of kv heads K (GQA), got {shapes}")
    dtypes = {jnp.dtype(x.dtype) for x in (query, key, value)}
    if len(dtypes) != 1 or not jnp.issubdtype(query.dtype, jnp.floating):
        raise ValueError(
            "query, key and value must share one floating dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable or None, got {type(fn).__name__}")
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise ValueError(f"block_mask must be a BlockMask, got {type(block_mask).__name__}")
        mb, mn, mt, ms = block_mask.shape
        if (mt, ms) != (q_len, key.shape[1]) or mb not in (1, batch) or mn not in (1, num_heads):
            raise ValueError(
                f"block_mask of shape [B', N', T, S] = {block_mask.shape} does not fit "
                f"{shapes}: it needs T = {q_len}, S = {key.shape[1]}, B' in (1, {batch}) and "
                f"N' in (1, {num_heads})"
            )
    if implementation is not None and implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None or one of {_IMPLEMENTATIONS}, got {implementation!r}"
        )


# --- the reference: 'xla' ------------------------------------------------------------------------


def _xla(query, key, value, score_mod, mask_mod, scale) -> tuple[Array, Array]:
    """Dense evaluation, `[B, N, T, S]` logits; differentiable by JAX (closed-over arrays too)."""
    batch, q_len, num_heads, head_dim = query.shape
    _, kv_len, num_kv_heads, _ = key.shape
    groups = num_heads // num_kv_heads
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = query.astype(dtype).reshape(batch, q_len, num_kv_heads, groups, head_dim)
    k, v, bad_keys = masking.split_nonfinite_keys(key.astype(dtype), value.astype(dtype))
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, precision=_HIGHEST)
    scores = scale * scores.reshape(batch, num_heads, q_len, kv_len)  # head n = k * G + g
    index = [jnp.arange(n, dtype=jnp.int32) for n in (batch, num_heads, q_len, kv_len)]
    if score_mod is not None:
        scores = jnp.asarray(_grid(score_mod, True)(scores, *index)).astype(dtype)
        scores = jnp.broadcast_to(scores, (batch, num_heads, q_len, kv_len))
    visible = jnp.ones((1, 1, 1, 1), bool)
    if mask_mod is not None:
        visible = jnp.asarray(_grid(mask_mod, False)(*index)).astype(bool)
    bad = jnp.repeat(jnp.moveaxis(bad_keys, 1, 2), groups, axis=1)[:, :, None]  # [B, N, 1, S]
    scores = masking.poison_rows(scores, jnp.any(visible & bad, axis=-1))
    logits = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    probs = jnp.exp(logits - row_max)
    row_sum = jnp.sum(probs, axis=-1)
    probs = probs / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
    probs = probs.reshape(batch, num_kv_heads, groups, q_len, kv_len)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, precision=_HIGHEST)
    out = out.reshape(batch, q_len, num_heads, head_dim).astype(query.dtype)
    lse = masking.safe_lse(row_max[..., 0], row_sum)  # [B, N, T]
    return out, jnp.swapaxes(lse, 1, 2)


# --- the kernel path: 'triton' -------------------------------------------------------------------


def _hoist(fn: Callable | None, *examples) -> tuple[Callable | None, tuple[Array, ...]]:
    """fn(*args) -> (fn'(*args, *consts), consts): every array fn closes over becomes an argument.

    `jax.closure_convert` hoists only the closed-over values that may be differentiated (float
    tracers); a kernel body can hold no array constant at all (document ids, a concrete table),
    so all of the traced function's constants are hoisted here. fn' evaluates fn's jaxpr with
    `_eval_mod`: a const may be passed as a `common.ConstRef` (a kernel input), whose element
    reads become loads."""
    if fn is None:
        return None, ()
    closed = jax.make_jaxpr(fn)(*examples)
    jaxpr, consts = closed.jaxpr, tuple(jnp.asarray(c) for c in closed.consts)

    def converted(*args):
        count = len(examples)
        return _eval_mod(jaxpr, args[count:], args[:count])[0]

    return converted, consts


_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call")


def _eval_mod(jaxpr, consts, args) -> list:
    """Evaluate a mod's jaxpr. Consts given as `common.ConstRef` stay in memory: an element
    read (dynamic_slice of size 1, a point gather; out-of-range indices clamped) becomes one
    load per element, so the Triton kernel, which lowers no gather, reads tables and id arrays;
    any other use loads the whole array. Calls (jit, custom_jvp) that receive one are inlined."""
    from jax.extend.core import ClosedJaxpr, Literal

    from pallas_kernels.common import ConstRef

    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = None
        if any(isinstance(x, ConstRef) for x in ins):
            outs = _read_const(eqn, ins)
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if outs is None and eqn.primitive.name in _CALLS and sub is not None:
                sub = sub if isinstance(sub, ClosedJaxpr) else ClosedJaxpr(sub, ())
                outs = _eval_mod(sub.jaxpr, sub.consts, ins[: len(sub.jaxpr.invars)])
            if outs is None:
                ins = [x.load() if isinstance(x, ConstRef) else x for x in ins]
        if outs is None:
            outs = _bind(eqn, ins)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _read_const(eqn, ins) -> list | None:
    """[value] when eqn reads single elements of a ConstRef (ins[0]), else None."""
    from pallas_kernels.common import ConstRef

    const, rest = ins[0], ins[1:]
    if not isinstance(const, ConstRef) or any(isinstance(x, ConstRef) for x in rest):
        return None
    shape, out_shape = const.shape, eqn.outvars[0].aval.shape
    name = eqn.primitive.name
    if any(size != 1 for size in eqn.params.get("slice_sizes", (0,))):
        return None
    if name == "dynamic_slice":
        coords = list(rest[: len(shape)])
    elif name == "gather":
        numbers = eqn.params["dimension_numbers"]
        if numbers.operand_batching_dims:
            return None
        indices = rest[0]
        coords = [jnp.zeros(indices.shape[:-1], jnp.int32)] * len(shape)
        for k, dim in enumerate(numbers.start_index_map):
            coords[dim] = indices[..., k]
    else:
        return None
    linear = jnp.zeros((), jnp.int32)
    for dim, coord in enumerate(coords):
        stride = int(np.prod(shape[dim + 1 :], dtype=np.int64))
        linear = linear + jnp.clip(jnp.asarray(coord, jnp.int32), 0, shape[dim] - 1) * stride
    return [const.take(linear).reshape(out_shape)]


def _flex_spec(score_mod, mask_mod, block_mask):
    """(FlexSpec, consts, blocks): the mods with every array they close over hoisted out, and
    the block mask's (kv_blocks, q_blocks), or () without one."""
    from pallas_kernels import flash_triton

    index = (jnp.int32(0),) * 4
    score_fn, score_consts = _hoist(score_mod, jnp.float32(0), *index)
    mask_fn, mask_consts = _hoist(mask_mod, *index)
    consts = score_consts + mask_consts
    flex = flash_triton.FlexSpec(
        score_mod=score_fn,
        mask_mod=mask_fn,
        num_score_consts=len(score_consts),
        const_shapes=tuple(c.shape for c in consts),
        block_mask=None if block_mask is None else (block_mask.block_q, block_mask.block_kv),
    )
    blocks = () if block_mask is None else (block_mask.kv_blocks, block_mask.q_blocks)
    return flex, consts, blocks


def _triton(query, key, value, score_mod, mask_mod, block_mask, scale, config):
    from pallas_kernels import flash_triton

    flex, consts, blocks = _flex_spec(score_mod, mask_mod, block_mask)
    return flash_triton.flex_attention(
        query, key, value, flex, consts, blocks, scale=scale, config=config
    )


def _mosaic(query, key, value, score_mod, mask_mod, block_mask, scale, config):
    from jattn.attention import hopper_or_newer
    from pallas_kernels import flash_mosaic

    if jax.default_backend() == "gpu" and not hopper_or_newer():
        raise NotImplementedError(
            "jattn.flex_attention: implementation 'mosaic' needs a Hopper GPU (sm_90) or newer; "
            "use 'triton'"
        )

    flex, consts, blocks = _flex_spec(score_mod, mask_mod, block_mask)
    vectors = None
    if consts:
        flex, vectors = _mosaic_vectors(flex, consts, query.shape[0], query.shape[1], key.shape[1])
    if config is None:  # the non-causal entry: ALiBi 7-12% faster forward than default_config
        # (H200, stop 29, 4k and 8k); None where the GPU has no table, float32, or on the CPU
        from jattn import autotune

        config = autotune.lookup_call("mosaic", query, key, causal=False)
    return flash_mosaic.flex_attention(
        query, key, value, flex, blocks, vectors=vectors, scale=scale, config=config
    )


# --- the Mosaic path's closed-over arrays: read outside the kernel, per query row and key ------


def _mosaic_vectors(flex, consts, batch: int, q_len: int, kv_len: int):
    """(FlexSpec with `vectors`, ([B, T], [B, S] int32)): the mods' reads of closed-over arrays
    (`flex.const_shapes`), moved out of the Mosaic GPU kernel, which cannot gather.

    A value of a mod that reads the arrays and depends on b and q_idx only (`docs[b, q_idx]`),
    or on b and kv_idx only (`docs[b, kv_idx]`), or on b alone (`prefix[b]`), is computed here
    for every row (key) of every batch, as jnp evaluates it in the 'xla' path; the kernel loads
    these vectors as it loads segment ids, and the mods take the row's and the key's value in
    place of the reads. Served: one such value per query row and one per key, over both mods,
    of integer or bool dtype. NotImplementedError (the Triton kernel reads the arrays itself)
    for a read whose index depends on h or on both q_idx and kv_idx (ALiBi's slopes[h], a
    relative-position table), a float value (a learnable bias, whose gradient the Triton path
    gives), or more than one value per row or key."""
    index = (jnp.int32(0),) * 4
    n_score = flex.num_score_consts
    mods = []  # the mods' jaxprs, with their arguments' roles and their arrays
    if flex.score_mod is not None:
        closed = jax.make_jaxpr(flex.score_mod)(jnp.float32(0), *index, *consts[:n_score])
        mods.append(_Traced(closed, ("tile", "b", "h", "q", "k"), consts[:n_score]))
    if flex.mask_mod is not None:
        closed = jax.make_jaxpr(flex.mask_mod)(*index, *consts[n_score:])
        mods.append(_Traced(closed, ("b", "h", "q", "k"), consts[n_score:]))
    channels = {"q": None, "k": None}  # a query row's value, a key's: (mod, var) or None
    for mod in mods:
        for var, kind in _array_reads(mod.closed.jaxpr, mod.roles):
            free = [c for c in ("q", "k") if c in kind and channels[c] in (None, (mod, var))]
            if not free:
                raise NotImplementedError(
                    "the Mosaic GPU kernel takes one value per query row and one per key from "
                    "closed-over arrays; these mods need more (use implementation='triton')"
                )
            channels[free[0]] = (mod, var)
    lengths = {"q": q_len, "k": kv_len}
    vectors = tuple(
        jnp.zeros((batch, lengths[c]), jnp.int32)
        if channels[c] is None
        else _per_row(*channels[c], c, batch, lengths[c])
        for c in ("q", "k")
    )
    wanted = {held[1]: c for c, held in channels.items() if held is not None}
    kernel_mods = [_kernel_mod(mod, wanted) for mod in mods]
    flex = dataclasses.replace(
        flex,
        score_mod=kernel_mods.pop(0) if flex.score_mod is not None else None,
        mask_mod=kernel_mods.pop(0) if flex.mask_mod is not None else None,
        num_score_consts=0,
        const_shapes=(),
        vectors=True,
    )
    return flex, vectors


@dataclasses.dataclass(frozen=True, eq=False)
class _Traced:
    closed: Any  # ClosedJaxpr of mod(*arguments, *arrays)
    roles: tuple[str, ...]  # the arguments': "tile" (score), "b", "h", "q", "k"
    arrays: tuple[Array, ...]


def _per_row(mod: _Traced, var, channel: str, batch: int, length: int) -> Array:
    """[B, length] int32: var of mod at b and q_idx (channel "q") or kv_idx ("k") = i, with
    the other arguments 0 (var does not depend on them)."""

    def one(b, i):
        args = dict(tile=jnp.float32(0), b=b, h=jnp.int32(0), q=jnp.int32(0), k=jnp.int32(0))
        args[channel] = i
        values = [args[r] for r in mod.roles] + list(mod.arrays)
        return _run(mod.closed.jaxpr, dict(zip(mod.closed.jaxpr.invars, values, strict=True)))[var]

    every = jax.vmap(jax.vmap(one, (None, 0)), (0, None))
    return every(jnp.arange(batch, dtype=jnp.int32), jnp.arange(length, dtype=jnp.int32)).astype(
        jnp.int32
    )


def _kernel_mod(mod: _Traced, wanted: dict) -> Callable:
    """mod for the kernel: its arguments, then the row's and the key's value, which stand for
    the values `wanted` names (var -> channel); the equations that read the arrays are left
    out."""
    from jax.extend.core import Literal

    jaxpr = mod.closed.jaxpr
    arguments = jaxpr.invars[: len(mod.roles)]

    def kernel_mod(*args):
        env = dict(zip(arguments, args[: len(mod.roles)], strict=True))
        for var, channel in wanted.items():
            value = args[len(mod.roles) + ("q", "k").index(channel)]
            dtype = var.aval.dtype
            env[var] = value != 0 if dtype == jnp.bool_ else value.astype(dtype)
        env = _run(jaxpr, env)
        (out,) = [v.val if isinstance(v, Literal) else env[v] for v in jaxpr.outvars]
        return out

    return kernel_mod


def _array_reads(jaxpr, roles) -> list:
    """[(var, kinds)]: the values through which a mod's jaxpr (arguments with `roles`, then its
    closed-over arrays) uses those arrays in the kernel, each a scalar computed from the arrays
    and b with q_idx ("q") or kv_idx ("k") or neither ("qk": either serves). NotImplementedError
    where an array is used otherwise."""
    from jax.extend.core import Literal

    roles = (*roles, *["const"] * (len(jaxpr.invars) - len(roles)))
    deps = {v: {r} for v, r in zip(jaxpr.invars, roles, strict=True)}
    deps |= {v: {"const"} for v in jaxpr.constvars}
    of = lambda v: set() if isinstance(v, Literal) else deps[v]  # noqa: E731

    def kinds(v) -> str | None:
        """Where a value that uses the arrays can be computed outside the kernel."""
        d = of(v)
        if "const" not in d:
            return None
        if d <= {"b", "const"}:
            return "qk"
        return "q" if d <= {"b", "q", "const"} else "k" if d <= {"b", "k", "const"} else None

    reads = {}
    for eqn in jaxpr.eqns:
        out = set().union(*map(of, eqn.invars))
        for v in eqn.outvars:
            deps[v] = out
        if all(kinds(v) for v in eqn.outvars):
            continue  # computed outside the kernel, if the kernel needs it
        for v in eqn.invars:  # computed in the kernel from values read outside it
            if kinds(v) is not None:
                reads[v] = kinds(v)
    for v in jaxpr.outvars:  # a mod's result computed outside the kernel whole
        if kinds(v) is not None:
            reads[v] = kinds(v)
    if any(v.aval.shape != () for v in reads):  # an array itself, indexed in the kernel
        raise NotImplementedError(
            "the Mosaic GPU kernel reads closed-over arrays only at indices given by b and "
            "q_idx, or b and kv_idx (not h, not both); use implementation='triton'"
        )
    for v in reads:
        if not (jnp.issubdtype(v.aval.dtype, jnp.integer) or v.aval.dtype == jnp.bool_):
            raise NotImplementedError(
                f"the Mosaic GPU kernel takes integer or bool values of closed-over arrays, not "
                f"{v.aval.dtype} (use implementation='triton')"
            )
    return list(reads.items())


def _run(jaxpr, env: dict) -> dict:
    """Evaluate the equations of jaxpr whose inputs env holds and whose outputs it does not
    (the kernel's mods hold the per-row values in place of the array reads that give them)."""
    from jax.extend.core import Literal

    env = dict(env)
    for eqn in jaxpr.eqns:
        if all(v in env for v in eqn.outvars):
            continue
        if any(not isinstance(v, Literal) and v not in env for v in eqn.invars):
            continue
        ins = [v.val if isinstance(v, Literal) else env[v] for v in eqn.invars]
        env.update(zip(eqn.outvars, _bind(eqn, ins), strict=True))
    return env


def _bind(eqn, ins) -> list:
    """eqn's primitive applied to ins: its outputs, as a list."""
    params = eqn.primitive.get_bind_params(eqn.params)  # older JAX: (subfuns, params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    outs = eqn.primitive.bind(*subfuns, *ins, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _auto_order(config, higher_order: bool) -> tuple[str, ...]:
    """What implementation=None tries, in order. Off the GPU, or under forward-mode or
    second-order autodiff: 'xla'. On Hopper: 'mosaic', then 'triton' where mosaic declines (mods
    that read arrays other than per query row and per key, or use what Mosaic GPU does not
    lower, float32, H > 256, block-mask blocks other than 128 query rows). On the H200 (16
    heads x 128, T = 4k, ms forward / forward+backward, results/flex_h200_mosaic.json) mosaic
    took 0.33 / 1.30 for ALiBi as a score_mod against triton's 0.44 / 1.62, and with a block
    mask 0.18 / 0.71 for causal as a mask_mod against 0.26 / 2.71, 0.08 / 0.32 for a document
    mask against 0.13 / 1.13. Other GPUs: 'triton'. A config picks its kernel."""
    from jattn.attention import hopper_or_newer
    from pallas_kernels.flash_mosaic import MosaicConfig
    from pallas_kernels.flash_triton import TritonConfig

    if jax.default_backend() != "gpu" or higher_order:
        return ("xla",)
    if isinstance(config, TritonConfig):
        return ("triton",)
    if isinstance(config, MosaicConfig):
        return ("mosaic",)
    if hopper_or_newer():
        return ("mosaic", "triton")
    return ("triton",)


# --- the public function -------------------------------------------------------------------------


def flex_attention(
    query: Array,  # [B, T, N, H]
    key: Array,  # [B, S, K, H]
    value: Array,  # [B, S, K, H]
    *,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    return_residual: bool = False,
    implementation: str | None = None,
    config: Any = None,
) -> Array | tuple[Array, Array]:
    """Attention with a user score_mod and mask_mod (FlexAttention's API, `[B, T, N, H]`).

    Args:
      query: `[B, T, N, H]`; key, value: `[B, S, K, H]` with N % K == 0 (head h reads kv head
        h // (N // K)); one floating dtype.
      score_mod: `(score, b, h, q_idx, kv_idx) -> score`, applied to `scale * q.k` (float32,
        or float64 on 'xla' with float64 inputs) before masking and softmax. A scalar
        function (vectorised with vmap); may close over arrays, which are differentiated.
      mask_mod: `(b, h, q_idx, kv_idx) -> bool`, True = attend. None: `block_mask.mask_mod`
        when a block mask is given, else every key is visible.
      block_mask: from `create_block_mask` with the same mask_mod, T and S: the kernel skips
        its empty blocks and does no mask arithmetic on its full ones (the result is defined
        by mask_mod; a block mask that disagrees with it gives a different result). Its block
        sizes become the Triton kernel's tiles.
      scale: default H ** -0.5.
      return_residual: also return the log-sum-exp `[B, T, N]` (in the query dtype).
      implementation: None, 'xla', 'triton' or 'mosaic' (see the module docstring).
      config: a `jattn.TritonConfig` for 'triton' (warps and stages; with a block mask its
        block sizes are the block mask's), a `jattn.MosaicConfig` for 'mosaic' (None: the
        autotune table's non-causal entry for the call's head dim and length, where the GPU has
        one, else `flash_mosaic.default_config`; a block mask fixes its tiles).

    Returns:
      `[B, T, N, H]` in the query dtype (and lse `[B, T, N]`). Rows that see no key: 0, lse
      -inf, zero gradients.

    Raises:
      ValueError: bad shapes, mods or block mask (named in the message); on 'triton', block
        mask blocks whose kernel pipelines do not fit the GPU's shared memory in one stage.
      NotImplementedError: 'triton' or 'mosaic' under forward-mode or second-order autodiff,
        float64, or head dims above 256 (use 'xla'); 'mosaic' with mods that read closed-over
        arrays other than as one integer or bool value per query row and one per key (slopes[h],
        a relative-position table, a float bias), or use what Mosaic GPU does not lower (log1p,
        jax.nn's custom_jvp functions such as relu), float32 or block-mask blocks other than 128
        query rows.

    Example (ALiBi and a document mask):
      >>> slopes = 2.0 ** -jnp.arange(1, 5)
      >>> alibi = lambda s, b, h, q, kv: s - slopes[h] * jnp.abs(q - kv)
      >>> docs = jnp.array([[0, 0, 1, 1, 1, 2]])
      >>> same_doc = lambda b, h, q, kv: docs[b, q] == docs[b, kv]
      >>> x = jnp.ones((1, 6, 4, 8))
      >>> flex_attention(x, x, x, score_mod=alibi, mask_mod=same_doc).shape
      (1, 6, 4, 8)
    """
    _check_inputs(query, key, value, score_mod, mask_mod, block_mask, implementation)
    if mask_mod is None and block_mask is not None:
        mask_mod = block_mask.mask_mod
    head_dim = query.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    forward, reverse = _autodiff_levels(
        SimpleNamespace(query=query, key=key, value=value, bias=None)
    )
    higher_order = forward or reverse > 1
    order = (implementation,)
    if implementation is None:
        order = _auto_order(config, higher_order)
        implementation = order[0]
    if implementation in ("triton", "mosaic") and higher_order:
        raise NotImplementedError(
            f"jattn.flex_attention: implementation {implementation!r} differentiates in reverse "
            "mode, once "
            "(a custom_vjp around its backward kernels), so it cannot serve forward-mode "
            "autodiff or a second derivative; use implementation='xla' (None picks it here)"
        )
    if implementation == "xla":
        if config is not None:
            raise ValueError(f"implementation 'xla' takes no config, got {config!r}")
        out, lse = _xla(query, key, value, score_mod, mask_mod, scale)
    else:
        if concrete_value(scale) is None:  # traced: scale * (q . k) == (scale * q) . k
            compute = jnp.promote_types(query.dtype, jnp.float32)
            query = (query.astype(compute) * scale).astype(query.dtype)
            scale = 1.0
        for i, name in enumerate(order):  # None: the next when one declines (at trace time)
            kernel = _mosaic if name == "mosaic" else _triton
            try:
                out, lse = kernel(query, key, value, score_mod, mask_mod, block_mask, scale, config)
                break
            except NotImplementedError:
                if i == len(order) - 1:
                    raise
    lse = lse.astype(out.dtype)
    return (out, lse) if return_residual else out
