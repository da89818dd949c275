"""A user's scalar mod (jattn.flex_attention's score_mod, mask_mod) evaluated over a Mosaic GPU
tile, from index vectors: `over_tile`.

The mod is a function of scalars (score, b, h, q_idx, kv_idx). The Mosaic kernels give it a
[bq, bk] tile of scores and the tile's query and key indices as vectors in the layouts they
broadcast from (WGMMA_ROW, WGMMA_COL). Its jaxpr is run on the smallest operands each value
needs (`_Val.kind`): what depends on q_idx only runs on the q vector, on kv_idx only on the k
vector, on neither on scalars, and a value is broadcast into the tile where an operation first
mixes it with the other index or a tile. Two things this saves per element, against full index
tiles: the iota, offset and clamp of each index, and (`_Lazy`) the int -> float conversion of
index arithmetic such as ALiBi's |q_idx - kv_idx|, which runs on the GPU's conversion unit (a
fraction of the FMA rate, beside the softmax's exp2 on the same kind of unit): an exact integer
chain (add, sub, neg, abs, max, min of indices and small literals, every value below 2**24) that
ends in a conversion to float is computed in float32 from converted vectors instead.

A third saving (`_Linear`): scalar factors are folded before they reach a tile. A tile times a
scalar, divided by one or negated, and sums and differences of such tiles, stay a list of
(tile, scalar factor) terms until something else reads them; the scalars multiply each other
(once a tile, not per element), and the sum is formed last, one multiply-add an extra term
(Mosaic GPU contracts them into FMAs). The kernels hand the score in as q.k with the softmax
scale as its factor and ask for the logits times log2(e) (`out_scale`), so ALiBi's
`score - slope * |q - kv|` costs q.k * (scale * log2 e) + |q - kv| * (-slope * log2 e): two
operations on the tile after the index difference, where scaling the score, the slope's multiply,
the subtraction and the base-2 change took four. On the H200 that is one FMA-pipe instruction
per element fewer and the same time within noise (stop 31, benchmarks/NOTES.md): ALiBi's cost
there is not its instruction count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

# Integer operations that float32 computes exactly while every value stays below 2**24.
_EXACT = {"add", "sub", "neg", "abs", "max", "min"}
_FLOAT_EXACT = 2**24
# Float operations a `_Linear` passes through (a tile times, or divided by, a scalar; sums).
_LINEAR = {"mul", "div", "neg", "add", "sub"}
_MAX_TERMS = 4  # a longer sum is formed where it stands
FOLD_FACTORS = True  # False: multiply where the jaxpr does (the A/B of benchmarks/dev/flex_fold)


@dataclasses.dataclass(frozen=True)
class _Lazy:
    """An int32 tile not yet computed: prim(*operands), each operand a `_Val`."""

    prim: Any
    params: dict
    operands: tuple


@dataclasses.dataclass(frozen=True)
class _Linear:
    """A float tile not yet formed: the sum of value * factor over `terms`, each value a `_Val`
    (a tile, or a vector or scalar added to it) and each factor a scalar or None (1)."""

    terms: tuple


@dataclasses.dataclass(frozen=True)
class _Val:
    value: Any  # an array, a scalar, or a _Lazy or _Linear tile
    kind: str | None  # "q", "k" (vectors along the tile's axes), "tile", None (a scalar)
    bound: int | None = None  # an integer value's largest magnitude, where known


def over_tile(
    fn,
    q_idx: Array,
    k_idx: Array,
    *tiles: Array,
    vectors=(),
    transposed: bool = False,
    index_bound: int | None = None,
    tile_scales: tuple = (),
    out_scale: float | None = None,
) -> Array:
    """out_scale * fn(*elements of tiles * tile_scales, q, k, *vectors' elements), fn a function
    of scalars, over a tile whose rows are the queries q_idx and columns the keys k_idx (keys
    down with transposed=True); vectors: () or (a value per query, a value per key), laid out as
    q_idx and k_idx (None where fn does not read it). index_bound: q_idx and k_idx are below it
    (None: unknown, no float rewrite). tile_scales: a scalar factor per tile (None: 1), applied
    where fn's arithmetic lets it fold (`_Linear`), as is out_scale (None: 1).

    jax.vmap over rows then columns would broadcast too, but through [bq, 1] and [1, bk]
    intermediates, which have no Mosaic GPU layout."""
    from jax.extend.core import Literal, jaxprs_in_params

    shape = (k_idx.shape[0], q_idx.shape[0]) if transposed else (q_idx.shape[0], k_idx.shape[0])
    dims = {None: (), "q": (1,) if transposed else (0,), "k": (0,) if transposed else (1,)}
    lengths = {"q": q_idx.shape, "k": k_idx.shape}

    def widen(val: _Val, to: str | None, dtype=None):
        """val's value as kind `to` (a _Lazy computed: in int32, or from float32 leaves when
        dtype is a float type)."""
        x = val.value
        if isinstance(x, _Lazy):
            return _compute(x, dtype)
        if isinstance(x, _Linear):
            return _form(x)
        if dtype is not None:
            x = lax.convert_element_type(x, dtype)
        if val.kind == to or to is None:
            return x
        if to == "tile":
            return lax.broadcast_in_dim(x, shape, dims[val.kind])
        return lax.broadcast_in_dim(x, lengths[to], ())

    def _compute(lazy: _Lazy, dtype):
        operands = [widen(v, "tile", dtype) for v in lazy.operands]
        return lazy.prim.bind(*operands, **lazy.params)

    def _form(linear: _Linear):
        """The tile of a `_Linear`: the sum of value * factor, vectors and scalars scaled before
        they are broadcast, the column vector first, so that each tile's product after it can
        contract into a multiply-add."""
        vectors, tiles = [], []
        for val, factor in linear.terms:
            if val.kind == "tile":
                tiles.append((val, factor))
                continue
            if factor is not None:  # a vector or scalar: scaled before it is broadcast
                x = widen(val, val.kind)
                val = _Val(x * _fill(factor, x), val.kind)
            vectors.append(val)
        # The vector along the tile's columns first: the tiles' products add to it as FMAs.
        columns = "q" if transposed else "k"
        vectors.sort(key=lambda v: v.kind != columns)
        total = widen(vectors[0], "tile") if vectors else None
        for val, factor in [*tiles, *[(v, None) for v in vectors[1:]]]:
            x = widen(val, "tile")
            if factor is not None:
                x = x * _fill(factor, x)
            total = x if total is None else total + x
        return total

    def _fill(factor, like):
        return lax.broadcast_in_dim(jnp.asarray(factor, like.dtype), like.shape, ())

    def terms_of(val: _Val) -> tuple:
        return val.value.terms if isinstance(val.value, _Linear) else ((val, None),)

    def times(factor, by):
        return by if factor is None else factor * by

    def scaled(val: _Val, by) -> _Val:
        return _Val(_Linear(tuple((v, times(f, by)) for v, f in terms_of(val))), "tile")

    def affine(val: _Val) -> tuple | None:
        """An exact integer index chain (a `_Lazy`) as float32 `_Linear` terms of index vectors
        and scalars where it is a sum of them (q_idx - kv_idx: a row term plus a column term,
        no index arithmetic per element), else None."""
        terms = _affine_terms(val)
        if terms is None:
            return None
        return tuple((_Val(_to_float(v.value), v.kind), f) for v, f in terms)

    def _to_float(x):  # a literal stays a concrete float32 (it has a dtype, as arrays do)
        if isinstance(x, (int, np.integer)):
            return np.float32(x)
        return lax.convert_element_type(x, jnp.float32)

    def _affine_terms(val: _Val) -> tuple | None:
        x = val.value
        if not isinstance(x, _Lazy):
            return ((val, None),) if val.kind in ("q", "k", None) else None
        name = x.prim.name
        parts = [_affine_terms(v) for v in x.operands]
        if any(p is None for p in parts):
            return None
        if name == "add":
            return parts[0] + parts[1]
        if name == "sub":
            return parts[0] + negated(parts[1])
        if name == "neg":
            return negated(parts[0])
        return None

    def negated(terms):
        return tuple((v, times(f, -1.0)) for v, f in terms)

    def linear(eqn, vals, kind) -> _Val | None:
        """eqn's result as a `_Linear` tile, or None where it is not one (see `_LINEAR`)."""
        name = eqn.primitive.name
        if not FOLD_FACTORS or name not in _LINEAR or kind != "tile":
            return None
        if not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
            return None
        if name == "neg":
            return scaled(vals[0], -1.0)
        tiles = [v for v in vals if v.kind == "tile"]
        if name in ("mul", "div"):  # a tile and a scalar
            if len(tiles) != 1 or any(v.kind not in ("tile", None) for v in vals):
                return None
            scalar = next(v for v in vals if v.kind is None).value
            if name == "div":
                if vals[0].kind != "tile" or _is_zero(scalar):  # x / 0 stays a division
                    return None
                return scaled(vals[0], 1.0 / scalar)
            return scaled(tiles[0], scalar)
        second = terms_of(vals[1])
        if name == "sub":
            second = tuple((v, times(f, -1.0)) for v, f in second)
        terms = terms_of(vals[0]) + second
        return _Val(_Linear(terms), "tile") if len(terms) <= _MAX_TERMS else None

    def exact_bound(eqn, vals) -> int | None:
        """The result's largest magnitude if eqn is an exact integer operation on operands of
        known bounds, else None."""
        dtype = eqn.outvars[0].aval.dtype
        if any(v.bound is None for v in vals) or not jnp.issubdtype(dtype, jnp.integer):
            return None
        bounds = [v.bound for v in vals]
        if eqn.primitive.name == "convert_element_type":  # between integer types
            return bounds[0] if bounds[0] <= jnp.iinfo(dtype).max else None
        if eqn.primitive.name not in _EXACT:
            return None
        return sum(bounds) if eqn.primitive.name in ("add", "sub") else max(bounds)

    def run(jaxpr, consts, args: list[_Val], wanted=None) -> list[_Val]:
        """jaxpr's outputs (those `wanted` flags, all when None) from args; equations whose
        results nothing reads are skipped (a gather's index wrapping, left unread once
        `jattn.flex` hands the read value in: no unused vector may reach a Mosaic kernel)."""
        env = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = _Val(value, None)
        env.update(zip(jaxpr.invars, args, strict=True))
        wanted = [True] * len(jaxpr.outvars) if wanted is None else wanted
        live, _ = _liveness(jaxpr, wanted)

        def read(v) -> _Val:
            if not isinstance(v, Literal):
                return env[v]
            integer = jnp.issubdtype(np.asarray(v.val).dtype, jnp.integer)
            return _Val(v.val, None, abs(int(v.val)) if integer else None)

        for eqn, outs_read in zip(jaxpr.eqns, live, strict=True):
            if not any(outs_read):
                continue
            vals = [read(v) for v in eqn.invars]
            present = {v.kind for v in vals if v.kind is not None}
            kind = "tile" if "tile" in present or len(present) > 1 else next(iter(present), None)
            sub = eqn.params.get("jaxpr")
            if eqn.primitive.name in ("pjit", "jit") and sub is not None:  # jnp's jitted helpers
                outs = run(sub.jaxpr, sub.consts, vals, outs_read)
                read_outs = zip(eqn.outvars, outs, outs_read, strict=True)
                env.update((v, o) for v, o, r in read_outs if r)
                continue
            folded = linear(eqn, vals, kind)
            if folded is not None:
                env[eqn.outvars[0]] = folded
                continue
            bound = exact_bound(eqn, vals)
            if kind == "tile" and bound is not None and bound < _FLOAT_EXACT:
                (out,) = eqn.outvars
                env[out] = _Val(_Lazy(eqn.primitive, eqn.params, tuple(vals)), "tile", bound)
                continue
            lazy_in = any(isinstance(v.value, _Lazy) for v in vals)
            to_float = eqn.primitive.name == "convert_element_type" and jnp.issubdtype(
                eqn.params["new_dtype"], jnp.floating
            )
            if lazy_in and to_float:  # the chain in float32, from converted leaves
                terms = affine(vals[0]) if FOLD_FACTORS else None
                if terms is not None and eqn.params["new_dtype"] == jnp.float32:
                    env[eqn.outvars[0]] = _Val(_Linear(terms), "tile")
                    continue
                value = widen(vals[0], "tile", jnp.float32).astype(eqn.params["new_dtype"])
                env[eqn.outvars[0]] = _Val(value, "tile")
                continue
            if any(jaxprs_in_params(eqn.params)):  # custom_jvp_call ...: all as tiles
                kind = "tile" if present else None
            values = [widen(v, kind) if kind else v.value for v in vals]
            params = eqn.primitive.get_bind_params(eqn.params)  # older JAX: (subfuns, params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)
            outs = eqn.primitive.bind(*subfuns, *values, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
            for var, out in zip(eqn.outvars, outs, strict=True):
                env[var] = _Val(out, kind, bound)
        return [read(v) if w else None for v, w in zip(jaxpr.outvars, wanted, strict=True)]

    args = (*tiles, q_idx, k_idx, *vectors)
    int32 = jax.ShapeDtypeStruct((), jnp.int32)  # a vector not loaded (None): never read
    closed = jax.make_jaxpr(fn)(
        *[int32 if x is None else jax.ShapeDtypeStruct((), x.dtype) for x in args]
    )
    kinds = ["tile"] * len(tiles) + ["q", "k"] + ["q", "k"][: len(vectors)]
    index = [index_bound, index_bound] + [None] * len(vectors)
    bounds = [None] * len(tiles) + index
    vals = [_Val(x, k, b) for x, k, b in zip(args, kinds, bounds, strict=True)]
    for i, factor in enumerate(tile_scales):
        if factor is not None:
            vals[i] = scaled(vals[i], factor)
            vals[i] = vals[i] if FOLD_FACTORS else _Val(widen(vals[i], "tile"), "tile")
    (out,) = run(closed.jaxpr, closed.consts, vals)
    if out_scale is not None and jnp.issubdtype(closed.out_avals[0].dtype, jnp.floating):
        out = scaled(_Val(widen(out, "tile"), "tile") if out.kind != "tile" else out, out_scale)
    return widen(out, "tile")


def _is_zero(x) -> bool:
    """Whether x is a concrete (not traced) zero."""
    return isinstance(x, (int, float, np.number, np.ndarray)) and bool(np.all(np.asarray(x) == 0))


def reads_arguments(fn, args, positions) -> bool:
    """Whether fn(*args) (args: shape-dtype structs) reads any of the arguments at positions
    for its result: unread ones (only a dead computation takes them) do not count."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    _, read = _liveness(jaxpr, [True] * len(jaxpr.outvars))
    return any(jaxpr.invars[i] in read for i in positions)


def _liveness(jaxpr, wanted: list[bool]) -> tuple[list[list[bool]], set]:
    """(per equation, which of its outputs the wanted outputs of jaxpr read; the variables
    they read, inputs included), by a backward pass."""
    from jax.extend.core import Literal

    outs = zip(jaxpr.outvars, wanted, strict=True)
    read = {v for v, w in outs if w and not isinstance(v, Literal)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        outs = [v in read for v in eqn.outvars]
        if eqn.effects:  # kept whatever reads it
            outs = [True] * len(outs)
        if any(outs):
            read.update(v for v in eqn.invars if not isinstance(v, Literal))
        live.append(outs)
    return live[::-1], read
