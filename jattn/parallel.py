"""Context-parallel attention: ring attention over a mesh axis (Liu et al. 2023, arXiv 2310.01889).

q, k, v `[B, T, N, H]` are cut along the sequence over the `n` devices of a mesh axis. Inside
`jax.shard_map` every device keeps its query block and the K/V blocks travel round the ring
(`jax.lax.ppermute`, device d -> d + 1), one hop per step; each step is one local
`jattn.dot_product_attention` (so the Pallas kernels serve it) returning (out, lse), and the partial
results merge exactly by log-sum-exp. A row that has seen no key yet has lse -inf and output 0,
never NaN. Memory per device is O(T/n): the backward is a second trip round the ring (a
`custom_vjp`) that rotates K/V again together with their gradients, saving only the local q, k, v,
output and lse, never the blocks seen on the way.

Causal attention is load-balanced by the zig-zag order (Brandon et al. 2023, "Striped attention",
and ring-flash-attention's zigzag): the sequence is cut into 2n chunks and device i holds chunks
i and 2n-1-i. At step 0 a device attends its own block causally; at every later step it attends
either its whole query block to the first half of the visiting K/V block (the visitor comes from
a lower device) or the second half of its query block to the whole visitor (a higher device):
half a block's work on every device at every step, and fully hidden block pairs are skipped
(the K/V still rotate). With `layout='contiguous'` (the default) callers shard the natural order
and `ring_attention` moves chunks into zig-zag order and back with two ppermutes each way, O(T/n)
per device; with `layout='zigzag'` the caller already holds `ring_order(x, n)` (permute tokens once
when loading data) and gets the output in that order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn import attention

LAYOUTS = ("contiguous", "zigzag")


# ---------------------------------------------------------------------------------------------
# Zig-zag order on whole arrays (for callers that shard in ring order themselves)


def _zigzag_chunks(n: int) -> np.ndarray:
    """Natural chunk index at each zig-zag position: device e holds chunks (e, 2n-1-e)."""
    return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], 1).reshape(-1)


def _permute_chunks(x, n: int, axis: int, order: np.ndarray):
    x = jnp.asarray(x)
    axis = axis % x.ndim
    length = x.shape[axis]
    if length % (2 * n):
        raise ValueError(
            f"zig-zag order cuts axis {axis} of {tuple(x.shape)} into 2n = {2 * n} chunks: its "
            f"length {length} must be divisible by {2 * n}"
        )
    chunks = x.reshape(*x.shape[:axis], 2 * n, length // (2 * n), *x.shape[axis + 1 :])
    return jnp.take(chunks, order, axis=axis).reshape(x.shape)


def ring_order(x, n: int, axis: int = 1):
    """Natural sequence order -> zig-zag order for `n` devices (axis `axis`, default the T of
    `[B, T, ...]`): cut into 2n chunks, device i's contiguous shard then holds chunks i and
    2n-1-i. Shard the result along `axis` and call `ring_attention(..., layout='zigzag')`."""
    return _permute_chunks(x, n, axis, _zigzag_chunks(n))


def ring_unorder(x, n: int, axis: int = 1):
    """The inverse of `ring_order`: zig-zag order -> natural order."""
    return _permute_chunks(x, n, axis, np.argsort(_zigzag_chunks(n)))


# ---------------------------------------------------------------------------------------------
# Inside shard_map: moving chunks between the natural and the zig-zag layouts


def _to_zigzag(x, axis: str, n: int):
    """x `[B, 2c, ...]`: natural chunks (2d, 2d+1) of device d -> zig-zag chunks (e, 2n-1-e).

    Even chunks travel in one ppermute, odd ones in another (each is a permutation of devices:
    chunk k goes to device k if k < n, else 2n-1-k); the receiver sorts them by its parity."""
    c = x.shape[1] // 2
    dest = lambda k: k if k < n else 2 * n - 1 - k  # noqa: E731
    even = lax.ppermute(x[:, :c], axis, [(d, dest(2 * d)) for d in range(n)])
    odd = lax.ppermute(x[:, c:], axis, [(d, dest(2 * d + 1)) for d in range(n)])
    first_even = lax.axis_index(axis) % 2 == 0
    return jnp.where(first_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))


def _from_zigzag(x, axis: str, n: int):
    """The inverse of `_to_zigzag`: device e's chunks (e, 2n-1-e) go home to device k // 2."""
    c = x.shape[1] // 2
    first_even = lax.axis_index(axis) % 2 == 0
    even = jnp.where(first_even, x[:, :c], x[:, c:])
    odd = jnp.where(first_even, x[:, c:], x[:, :c])
    # Device e's even chunk is e (e even) or 2n-1-e (e odd); its odd chunk the other one.
    even_chunk = lambda e: e if e % 2 == 0 else 2 * n - 1 - e  # noqa: E731
    odd_chunk = lambda e: e if e % 2 else 2 * n - 1 - e  # noqa: E731
    even = lax.ppermute(even, axis, [(e, even_chunk(e) // 2) for e in range(n)])
    odd = lax.ppermute(odd, axis, [(e, odd_chunk(e) // 2) for e in range(n)])
    return jnp.concatenate([even, odd], 1)


# ---------------------------------------------------------------------------------------------
# One device's share of the ring


def _attend(q, k, v, q_ids, kv_ids, *, causal, options):
    """Local attention -> (out float32, lse float32). The float32 lse comes from the dispatcher
    (the public call rounds it to the input dtype, too coarse to merge bf16 partials)."""
    segment_ids = None if q_ids is None else (q_ids, kv_ids)
    args = attention.check_attention_args(
        q, k, v, scale=options["scale"], is_causal=causal, segment_ids=segment_ids
    )
    out, lse = attention._run(args, options["implementation"], options["config"])
    return out.astype(jnp.float32), lse.astype(jnp.float32)


def _block(step, q, k, v, q_ids, kv_ids, *, axis, n, causal, options):
    """The partial (out, lse) of the local query block against the K/V block visiting at
    `step` (it comes from device i - step), full-size: rows that see nothing get 0 and -inf."""
    if not causal:
        return _attend(q, k, v, q_ids, kv_ids, causal=False, options=options)
    c = q.shape[1] // 2
    half = lambda ids, part: None if ids is None else ids[:, part]  # noqa: E731

    def diagonal(q, k, v, q_ids, kv_ids):  # own block: zig-zag keeps causal order locally
        return _attend(q, k, v, q_ids, kv_ids, causal=True, options=options)

    def from_below(q, k, v, q_ids, kv_ids):  # all queries see the visitor's first chunk only
        k, v, kv_ids = k[:, :c], v[:, :c], half(kv_ids, slice(None, c))
        return _attend(q, k, v, q_ids, kv_ids, causal=False, options=options)

    def from_above(q, k, v, q_ids, kv_ids):  # only the second query chunk sees the visitor
        out, lse = _attend(
            q[:, c:], k, v, half(q_ids, slice(c, None)), kv_ids, causal=False, options=options
        )
        hidden_out = jnp.zeros((q.shape[0], c, *out.shape[2:]), out.dtype)
        hidden_lse = jnp.full((q.shape[0], c, lse.shape[2]), -jnp.inf, lse.dtype)
        return jnp.concatenate([hidden_out, out], 1), jnp.concatenate([hidden_lse, lse], 1)

    me = lax.axis_index(axis)
    source = (me - step) % n
    case = jnp.where(step == 0, 0, jnp.where(source < me, 1, 2))
    return lax.switch(case, (diagonal, from_below, from_above), q, k, v, q_ids, kv_ids)


def _attend_gradients(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, *, causal, options):
    """(dq, dk, dv) float32 of the local attention's share of the ring's gradients, from a
    backward kernel fed the merged out and lse (`attention.attention_backward`): no forward is
    recomputed. None when no implementation in the order has such a backward."""
    segment_ids = None if q_ids is None else (q_ids, kv_ids)
    args = attention.check_attention_args(
        q, k, v, scale=options["scale"], is_causal=causal, segment_ids=segment_ids
    )
    grads = attention.attention_backward(
        args,
        options["implementation"],
        options["config"],
        out.astype(q.dtype),
        lse,
        d_out.astype(q.dtype),
        d_lse,
    )
    return None if grads is None else tuple(g.astype(jnp.float32) for g in grads)


def _block_gradients(step, q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, *, axis, n, causal,
                     options):  # fmt: skip
    """`_block`'s gradients at the merged (out, lse): the same three cases of a causal ring,
    each attending only what it sees, zeros for the rest. lse: +inf on rows that see nothing
    anywhere (their probabilities are 0 in every block)."""
    grads = functools.partial(_attend_gradients, options=options)
    if not causal:
        return grads(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, causal=False)
    c = q.shape[1] // 2
    half = lambda ids, part: None if ids is None else ids[:, part]  # noqa: E731
    first, second = slice(None, c), slice(c, None)

    def diagonal(q, k, v, q_ids, kv_ids):
        return grads(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, causal=True)

    def from_below(q, k, v, q_ids, kv_ids):  # all queries, the visitor's first chunk
        dq, dk, dv = grads(
            q, k[:, first], v[:, first], q_ids, half(kv_ids, first), out, lse, d_out, d_lse,
            causal=False,
        )  # fmt: skip
        hidden = jnp.zeros(dk.shape, dk.dtype)
        return dq, jnp.concatenate([dk, hidden], 1), jnp.concatenate([dv, hidden], 1)

    def from_above(q, k, v, q_ids, kv_ids):  # the second query chunk, the whole visitor
        dq, dk, dv = grads(
            q[:, second], k, v, half(q_ids, second), kv_ids, out[:, second], lse[:, second],
            d_out[:, second], d_lse[:, second], causal=False,
        )  # fmt: skip
        return jnp.concatenate([jnp.zeros(dq.shape, dq.dtype), dq], 1), dk, dv

    me = lax.axis_index(axis)
    source = (me - step) % n
    case = jnp.where(step == 0, 0, jnp.where(source < me, 1, 2))
    return lax.switch(case, (diagonal, from_below, from_above), q, k, v, q_ids, kv_ids)


def _has_residual_backward(q, k, v, q_ids, kv_ids, *, causal, options) -> bool:
    """Whether `_attend_gradients` serves these blocks (traced on shapes only)."""
    shape = lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    lse = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
    found = jax.eval_shape(
        functools.partial(_attend_gradients, causal=causal, options=options),
        *map(shape, (q, k, v, q_ids, kv_ids, q)), lse, shape(q), lse,
    )  # fmt: skip
    return found is not None


UNROLL_STEPS = 8  # rings of up to this many steps are unrolled


def _loop(steps: int, body, carry):
    """`body(s, carry)` for s < steps: unrolled up to UNROLL_STEPS, so that XLA's scheduler can
    overlap one step's transfers (the next K/V block, the dK/dV accumulators going home) with
    the next step's kernels, which a while loop's boundary hides from it; a fori_loop beyond."""
    if steps > UNROLL_STEPS:
        return lax.fori_loop(0, steps, body, carry)
    for s in range(steps):
        carry = body(s, carry)
    return carry


def _merge(out, lse, block_out, block_lse):
    """Exact log-sum-exp merge of two partials; -inf rows contribute nothing (never NaN). The
    shift m cancels, so it carries no gradient."""
    m = lax.stop_gradient(jnp.maximum(lse, block_lse))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w, w_block = jnp.exp(lse - m), jnp.exp(block_lse - m)
    total = w + w_block
    safe = jnp.where(total > 0, total, 1.0)
    merged = (w[..., None] * out + w_block[..., None] * block_out) / safe[..., None]
    return merged, jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)


def _rotate(tree, axis: str, n: int):
    """Every device passes its blocks to the next one on the ring."""
    perm = [(d, (d + 1) % n) for d in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis, perm), tree)


def _ring_forward(q, k, v, q_ids, kv_ids, *, axis, n, causal, options):
    block = functools.partial(_block, axis=axis, n=n, causal=causal, options=options)
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:3], -jnp.inf, jnp.float32)

    def step(s, carry):
        visitor, out, lse = carry
        following = _rotate(visitor, axis, n)  # independent of this step's compute: overlaps
        out, lse = _merge(out, lse, *block(s, q, *visitor[:2], q_ids, visitor[2]))
        return following, out, lse

    visitor, out, lse = _loop(n - 1, step, ((k, v, kv_ids), out, lse))
    out, lse = _merge(out, lse, *block(n - 1, q, *visitor[:2], q_ids, visitor[2]))
    return out, lse


def _ring_backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, *, axis, n, causal, options):
    """Second trip round the ring: dK/dV travel with their block and arrive home after n hops.

    Each block pair's gradients come from a backward kernel fed the merged out and lse
    (`_block_gradients`: P = exp(logits - lse) is the pair's share of the whole row's softmax,
    so nothing is recomputed), where the implementation has one. Otherwise from the pair's own
    vjp, recomputing its partial (out_s, lse_s), with cotangents w·d_out and
    w·(<d_out, out_s> - <d_out, out> + d_lse), w the pair's merge weight exp(lse_s - lse)."""
    statics = dict(axis=axis, n=n, causal=causal, options=options)
    block = functools.partial(_block, **statics)
    d_out = d_out.astype(jnp.float32)
    d_lse = d_lse.astype(jnp.float32)
    residual = _has_residual_backward(q, k, v, q_ids, kv_ids, causal=causal, options=options)
    if residual:
        seen_lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # rows that see nothing: P = 0
    else:
        delta = jnp.sum(d_out * out, -1)  # [B, T, N]

    def pair_gradients(s, k_s, v_s, kv_ids_s):
        if residual:
            return _block_gradients(
                s, q, k_s, v_s, q_ids, kv_ids_s, out, seen_lse, d_out, d_lse, **statics
            )
        (out_s, lse_s), pull = jax.vjp(
            lambda q, k, v: block(s, q, k, v, q_ids, kv_ids_s), q, k_s, v_s
        )
        w = jnp.where(jnp.isfinite(lse_s), jnp.exp(lse_s - jnp.where(jnp.isfinite(lse), lse, 0)), 0)
        d_lse_s = w * (jnp.sum(d_out * out_s, -1) - delta + d_lse)
        return pull((w[..., None] * d_out, d_lse_s))

    def step(s, carry):
        visitor, dq, dk, dv = carry
        following = _rotate(visitor, axis, n)
        dq_s, dk_s, dv_s = pair_gradients(s, *visitor)
        dk, dv = _rotate((dk + dk_s, dv + dv_s), axis, n)
        return following, dq + dq_s, dk, dv

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    init = ((k, v, kv_ids), zeros(q), zeros(k), zeros(v))
    _, dq, dk, dv = _loop(n, step, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _ring_local(q, k, v, q_ids, kv_ids, *, axis, n, causal, options):
    """Per device, differentiable: a custom_vjp so only local blocks are saved (O(T/n))."""
    statics = dict(axis=axis, n=n, causal=causal, options=options)

    @jax.custom_vjp
    def ring(q, k, v, q_ids, kv_ids):
        return _ring_forward(q, k, v, q_ids, kv_ids, **statics)

    def forward(q, k, v, q_ids, kv_ids):
        out, lse = _ring_forward(q, k, v, q_ids, kv_ids, **statics)
        return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)

    def backward(residuals, cotangents):
        q, k, v, q_ids, kv_ids, out, lse = residuals
        d_out, d_lse = cotangents
        grads = _ring_backward(q, k, v, q_ids, kv_ids, out, lse, d_out, d_lse, **statics)
        return (*grads, None, None)

    ring.defvjp(forward, backward)
    return ring(q, k, v, q_ids, kv_ids)


@functools.partial(
    jax.jit,
    static_argnames=(
        "mesh",
        "axis",
        "batch_axis",
        "causal",
        "layout",
        "return_residual",
        "options",
    ),
)
def _ring_attention(
    q, k, v, q_ids, kv_ids, *, mesh, axis, batch_axis, causal, layout, return_residual, options
):
    n = mesh.shape[axis]
    options = dict(options)
    reorder = causal and layout == "contiguous"

    def local(q, k, v, q_ids, kv_ids):
        if reorder:
            q, k, v, q_ids, kv_ids = (
                None if x is None else _to_zigzag(x, axis, n) for x in (q, k, v, q_ids, kv_ids)
            )
        out, lse = _ring_local(
            q, k, v, q_ids, kv_ids, axis=axis, n=n, causal=causal, options=options
        )
        if reorder:
            out, lse = _from_zigzag(out, axis, n), _from_zigzag(lse, axis, n)
        return out.astype(q.dtype), lse.astype(q.dtype)

    seq = P(batch_axis, axis, None, None)
    ids = None if q_ids is None else P(batch_axis, axis)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(seq, seq, seq, ids, ids),
        out_specs=(seq, P(batch_axis, axis, None)),
        check_vma=False,
    )
    args = (q, k, v, q_ids, kv_ids)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # shard_map checks placements on Explicit axes instead of resharding: move inputs first.
        specs = (seq, seq, seq, ids, ids)
        args = tuple(
            x if x is None else jax.sharding.reshard(x, NamedSharding(mesh, spec))
            for x, spec in zip(args, specs, strict=True)
        )
    out, lse = fn(*args)
    return (out, lse) if return_residual else out


def ring_attention(
    query,
    key,
    value,
    *,
    mesh: Mesh,
    axis: str,
    batch_axis: str | None = None,
    is_causal: bool = False,
    segment_ids=None,
    scale: float | None = None,
    layout: str = "contiguous",
    return_residual: bool = False,
    implementation: str | None = None,
    config=None,
):
    """`jattn.dot_product_attention` with the sequence cut over the devices of `mesh.shape[axis]`.

    Args:
      query: `[B, T, N, H]`; key, value: `[B, S, K, H]` (N % K == 0: GQA), sharded (or to be
        sharded) along T and S over `axis`: each device holds T/n queries and S/n keys.
      mesh, axis: the devices of the ring. Other mesh axes see the arrays replicated, except
        `batch_axis` (say data parallelism), over which B is cut (B % its size == 0).
      is_causal: query i sees keys j <= i (needs S == T, divisible by 2n: zig-zag chunks).
      segment_ids: `(q_ids [B, T], kv_ids [B, S])` integers, packed sequences; kv ids travel
        with the K/V blocks. A query that sees no key gets output 0 and lse -inf.
      scale: a Python float (default H ** -0.5).
      layout: 'contiguous' (the natural order, device d holds tokens [d T/n, (d+1) T/n)) or
        'zigzag' (the caller holds `ring_order(x, n)`, and gets the output in that order; no
        reordering inside). Only causal attention reorders; non-causal ignores it.
      return_residual: also return the log-sum-exp `[B, T, N]` (in the query dtype).
      implementation, config: for the local `dot_product_attention` of each step.

    Returns:
      `[B, T, N, H]` in the query dtype, sharded along T over `axis`: equal to one device's
      `dot_product_attention` (within the dtype's tolerance). Differentiable in q, k, v.

    Raises:
      ValueError: shapes that do not fit the ring (naming them), a bad axis or layout.
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    if batch_axis is not None and (batch_axis not in mesh.axis_names or batch_axis == axis):
        raise ValueError(
            f"batch_axis {batch_axis!r} must be another axis of the mesh {dict(mesh.shape)}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(is_causal, bool | np.bool_):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    if scale is not None and not isinstance(scale, int | float | np.floating | np.integer):
        raise ValueError(f"ring_attention's scale must be a Python float, got {scale!r}")
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
    if query.ndim != 4 or key.ndim != 4 or key.shape != value.shape:
        raise ValueError(
            f"ring_attention needs query [B, T, N, H] and key, value [B, S, K, H] of one shape; "
            f"got {shapes}"
        )
    n = mesh.shape[axis]
    batch, q_len, heads, dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if key.shape[0] != batch or key.shape[3] != dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"ring_attention: B, H must agree and N % K == 0; got {shapes}")
    if batch_axis is not None and batch % mesh.shape[batch_axis]:
        raise ValueError(
            f"ring_attention cuts B over the {mesh.shape[batch_axis]} devices of batch_axis "
            f"{batch_axis!r}: B must be divisible by it; got {shapes}"
        )
    if q_len % n or kv_len % n:
        raise ValueError(
            f"ring_attention cuts T and S over the {n} devices of axis {axis!r}: both must be "
            f"divisible by {n}; got {shapes}"
        )
    if is_causal and (q_len != kv_len or q_len % (2 * n)):
        raise ValueError(
            f"causal ring_attention needs S == T divisible by 2n = {2 * n} (zig-zag chunks over "
            f"the {n} devices of axis {axis!r}); got {shapes}"
        )
    q_ids = kv_ids = None
    if segment_ids is not None:
        q_ids, kv_ids = (jnp.asarray(x) for x in segment_ids)
        if q_ids.shape != (batch, q_len) or kv_ids.shape != (batch, kv_len):
            raise ValueError(
                f"segment_ids must be ([B, T], [B, S]) = ({(batch, q_len)}, {(batch, kv_len)}); "
                f"got ({q_ids.shape}, {kv_ids.shape})"
            )
        if not (
            jnp.issubdtype(q_ids.dtype, jnp.integer) and jnp.issubdtype(kv_ids.dtype, jnp.integer)
        ):
            raise ValueError(f"segment_ids must be integers, got {q_ids.dtype}, {kv_ids.dtype}")
        q_ids, kv_ids = q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) != 1 or not jnp.issubdtype(query.dtype, jnp.floating):
        raise ValueError(
            f"ring_attention needs query, key and value of one float dtype; got {query.dtype}, "
            f"{key.dtype}, {value.dtype} ({shapes})"
        )
    options = (
        ("scale", None if scale is None else float(scale)),
        ("implementation", implementation),
        ("config", config),
    )
    return _ring_attention(
        query,
        key,
        value,
        q_ids,
        kv_ids,
        mesh=mesh,
        axis=axis,
        batch_axis=batch_axis,
        causal=bool(is_causal),
        layout=layout,
        return_residual=return_residual,
        options=options,
    )
