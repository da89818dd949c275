"""Decode attention with the KV cache sharded over a mesh axis of "attention devices".

Two ways to cut the cache over the `axis` of a `jax.sharding.Mesh`:

- `shard_by="heads"` (Lamina's choice): each device holds K/n kv heads of every sequence and
  computes its query heads' attention whole; outputs concatenate, no combine. Needs K % n == 0,
  so a GQA model with 8 kv heads stops at 8 devices.
- `shard_by="sequence"` (split-KV across devices): each device holds S/n cache slots of every
  sequence, computes a partial output and its log-sum-exp, and the partials merge exactly after
  one `all_gather` of (out, lse): m = max_d lse_d, w_d = exp(lse_d - m),
  out = sum_d w_d out_d / sum_d w_d. A device whose slots are all past a sequence's length has
  lse -inf and weight 0 (never NaN). No cap on n beyond S % n == 0.

  Which device holds token p: `token_order="contiguous"` (the caller's cache in natural order,
  device d holds tokens [d S/n, (d+1) S/n)) or `"striped"` (token p on device p mod n, at its
  local slot p div n: Striped Attention's order, Brandon et al. 2023). A `KVCache` sharded by
  sequence is striped, so every device holds a share of each sequence whatever its length (with
  contiguous slices, a sequence of length S/3 sits on the first devices alone; on 2 H200s at
  S = 128k with lengths spread from S/3 to S, 1.34x one GPU contiguous).

Everything runs under `jax.shard_map` inside `jax.jit`; the same code is multi-controller SPMD
under `jax.distributed.initialize` (the mesh then spans processes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn.attention import concrete_value
from jattn.decode import decode_attention

SHARD_BY = ("heads", "sequence")


def make_mesh(devices, axis: str = "attn") -> Mesh:
    """A 1-D mesh over `devices` with the given axis name (Auto axis type: shard_map reshards)."""
    devices = list(devices)
    return jax.make_mesh(
        (len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def cache_spec(shard_by: str, axis: str) -> P:
    """PartitionSpec of a `[B, S, K, H]` cache sharded by kv heads or by sequence slots."""
    _check_shard_by(shard_by)
    return P(None, None, axis, None) if shard_by == "heads" else P(None, axis, None, None)


def _check_shard_by(shard_by: str) -> None:
    if shard_by not in SHARD_BY:
        raise ValueError(f"shard_by must be one of {SHARD_BY}, got {shard_by!r}")


def check_shardable(cache_shape, mesh: Mesh, axis: str, shard_by: str) -> int:
    """Raise ValueError when `[B, S, K, H]` cannot be cut n ways; returns n."""
    _check_shard_by(shard_by)
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    n = mesh.shape[axis]
    _, capacity, kv_heads, _ = cache_shape
    if shard_by == "heads" and kv_heads % n:
        raise ValueError(
            f"shard_by='heads' needs kv heads K = {kv_heads} divisible by the {n} devices on "
            f"axis {axis!r} (cache {tuple(cache_shape)}); use shard_by='sequence'"
        )
    if shard_by == "sequence" and capacity % n:
        raise ValueError(
            f"shard_by='sequence' needs the cache length S = {capacity} divisible by the {n} "
            f"devices on axis {axis!r} (cache {tuple(cache_shape)})"
        )
    return n


def merge_over_axis(out: jax.Array, lse: jax.Array, axis: str) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map: exact log-sum-exp merge of per-device partials (empty ones are safe).

    out `[..., H]` (any dtype; merged in float32), lse `[...]` float32 (-inf: no keys here).
    One collective: an all_gather of (out, lse) packed as `[..., H + 1]` float32 (a decode
    step's partials are small; on 2 H200s one collective costs ~40 us inside a program, so
    pmax + two psums cost three times that).
    """
    packed = jnp.concatenate([out.astype(jnp.float32), lse[..., None]], -1)  # [..., H + 1]
    gathered = lax.all_gather(packed, axis)  # [n, ..., H + 1]
    outs, lses = gathered[..., :-1], gathered[..., -1]
    m = jnp.max(lses, 0, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m)  # [n, ...]: 0 where a device had no keys
    m = m[0]
    total = jnp.sum(w, 0)
    merged = jnp.sum(w[..., None] * outs, 0)
    has_keys = total > 0
    safe = jnp.where(has_keys, total, 1.0)
    return merged / safe[..., None], jnp.where(has_keys, m + jnp.log(safe), -jnp.inf)


def _placed(mesh: Mesh, specs, args):
    """On a mesh with Explicit axes shard_map checks placements instead of resharding: move the
    inputs first (on Auto meshes shard_map reshards by itself)."""
    if all(t != jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return args
    return tuple(
        jax.sharding.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, specs, strict=True)
    )


def _onto_mesh(mesh: Mesh, specs, args):
    """Concrete arrays committed to devices outside the mesh (say the cache on 2 devices, the
    mesh over 4 others) are moved onto it first: jit refuses arguments on devices other than
    the computation's. Arrays already on the mesh's devices (and traced ones) pass unchanged."""
    devices = set(mesh.devices.flat)
    moved = []
    for x, spec in zip(args, specs, strict=True):
        if (
            isinstance(x, jax.Array)
            and not isinstance(x, jax.core.Tracer)
            and getattr(x, "committed", True)
            and x.sharding.device_set != devices
        ):
            x = jax.device_put(x, NamedSharding(mesh, spec))
        moved.append(x)
    return tuple(moved)


def _host_lengths(lengths) -> np.ndarray | None:
    """A cache's lengths on the host when they are concrete (None under a trace). Replicated, so
    one addressable shard holds them all (also when the mesh spans processes)."""
    if isinstance(lengths, jax.core.Tracer):
        return None
    return np.asarray(lengths.addressable_shards[0].data)


TOKEN_ORDERS = ("contiguous", "striped")


def _local_lengths(lengths: jax.Array, local_capacity: int, axis: str, token_order: str):
    """This device's share of each sequence's length (its valid slots are a prefix of its
    local slice in both orders)."""
    me = lax.axis_index(axis)
    if token_order == "striped":  # tokens me, me + n, me + 2n, ... below the length
        n = lax.axis_size(axis)
        local = (lengths - me + n - 1) // n
    else:
        local = lengths - me * local_capacity
    return jnp.clip(local, 0, local_capacity).astype(jnp.int32)


def in_token_order(slots: jax.Array, n: int) -> jax.Array:
    """A striped `[B, S, ...]` cache (token p at slot (p mod n) S/n + p div n) in token order."""
    b, s = slots.shape[:2]
    x = slots.reshape(b, n, s // n, *slots.shape[2:])
    return jnp.swapaxes(x, 1, 2).reshape(slots.shape)


def striped(tokens: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """The inverse of `in_token_order` along `axis` (length divisible by n): tokens in natural
    order -> n contiguous blocks, block d holding tokens d, d + n, ..."""
    shape = tokens.shape
    x = tokens.reshape(*shape[:axis], shape[axis] // n, n, *shape[axis + 1 :])
    return jnp.swapaxes(x, axis, axis + 1).reshape(shape)


@functools.partial(
    jax.jit,
    static_argnames=(
        "mesh",
        "axis",
        "shard_by",
        "scale",
        "logits_soft_cap",
        "return_residual",
        "implementation",
        "config",
        "token_order",
    ),
)
def _sharded(q, k, v, lengths, *, mesh, axis, shard_by, return_residual, token_order, **options):
    if shard_by == "heads":

        def local(q, k, v, lengths):
            return decode_attention(q, k, v, lengths, return_residual=True, **options)

        out_specs = (P(None, axis, None), P(None, axis))
        in_specs = (
            P(None, axis, None),
            cache_spec(shard_by, axis),
            cache_spec(shard_by, axis),
            P(),
        )
    else:
        local_capacity = k.shape[1] // mesh.shape[axis]

        def local(q, k, v, lengths):
            part_lengths = _local_lengths(lengths, local_capacity, axis, token_order)
            out, lse = decode_attention(q, k, v, part_lengths, return_residual=True, **options)
            out, lse = merge_over_axis(out, lse, axis)
            return out.astype(q.dtype), lse

        out_specs = (P(), P())
        in_specs = (P(), cache_spec(shard_by, axis), cache_spec(shard_by, axis), P())
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    args = _placed(mesh, in_specs, (q, k, v, lengths.astype(jnp.int32)))
    out, lse = fn(*args)
    return (out, lse) if return_residual else out


def sharded_decode_attention(
    query,
    k_cache,
    v_cache,
    lengths,
    *,
    mesh: Mesh,
    axis: str = "attn",
    shard_by: str = "heads",
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    implementation: str | None = None,
    config=None,
    token_order: str = "contiguous",
):
    """`jattn.decode_attention` with the cache cut over `mesh.shape[axis]` devices.

    Args:
      query: `[B, N, H]`; k_cache, v_cache: `[B, S, K, H]`; lengths: int `[B]` in [0, S].
      mesh, axis: the attention devices. Inputs may live anywhere: they are resharded to
        `cache_spec(shard_by, axis)` (place the cache there once, e.g. with `KVCache`, so nothing
        moves per step).
      shard_by: 'heads' (K % n == 0) or 'sequence' (S % n == 0); see the module docstring.
      token_order: with shard_by='sequence', where token p of the cache is: 'contiguous' (slot
        p) or 'striped' (slot (p mod n) S/n + p div n, as `striped(cache, n)` lays it out and
        a `KVCache` keeps it: every device then holds 1/n of each sequence's tokens).
      Other arguments as in `jattn.decode_attention` (implementation/config go to the per-device
      kernel).

    Returns:
      `[B, N, H]` (and lse `[B, N]`): equal to `decode_attention` on one device for any n.
    """
    query, k_cache, v_cache = (jnp.asarray(x) for x in (query, k_cache, v_cache))
    lengths = jnp.asarray(lengths)
    if query.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"sharded_decode_attention needs query [B, N, H] and caches [B, S, K, H] of one "
            f"shape; got query {query.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}"
        )
    check_shardable(k_cache.shape, mesh, axis, shard_by)
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
    query, k_cache, v_cache, lengths = _onto_mesh(
        mesh,
        (
            P(None, axis, None) if shard_by == "heads" else P(),
            *[cache_spec(shard_by, axis)] * 2,
            P(),
        ),
        (query, k_cache, v_cache, lengths),
    )
    known = concrete_value(lengths)
    if known is not None and ((known < 0).any() or (known > k_cache.shape[1]).any()):
        raise ValueError(f"lengths must lie in [0, S = {k_cache.shape[1]}], got {known.tolist()}")
    if lengths.shape != (query.shape[0],):
        raise ValueError(f"lengths must be [B] = ({query.shape[0]},), got {lengths.shape}")
    return _sharded(
        query,
        k_cache,
        v_cache,
        lengths,
        mesh=mesh,
        axis=axis,
        shard_by=shard_by,
        scale=scale,
        logits_soft_cap=logits_soft_cap,
        return_residual=return_residual,
        implementation=implementation,
        config=config,
        token_order=token_order,
    )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["keys", "values", "lengths", "overflow"],
    meta_fields=["mesh", "axis", "shard_by"],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A decoder's KV cache on the attention mesh: one `[B, S, K, H]` pair per layer.

    `keys`/`values` are sharded with `NamedSharding(mesh, cache_spec(shard_by, axis))`, `lengths`
    `[B]` is replicated. Create with `KVCache.create`; `append` writes one token per sequence in
    place (the cache is donated), `advance` bumps the lengths after the last layer. Sharded by
    sequence, the slots are striped (`token_order`): token p of a sequence is on device
    p mod n; `in_token_order` gives a layer in natural order.

    A full cache never drops a token silently. Called eagerly (concrete lengths), `append`,
    `append_and_attend` and `advance` raise `ValueError` when a sequence is full (this reads the
    `[B]` lengths back to the host). Under a trace (inside the caller's `jit`, `scan`, ...) the
    token of a full sequence is not written, its length stays at the capacity, and
    `overflow[b]` (bool `[B]`, replicated) turns True and stays True: read it, or call
    `cache.check()` outside the trace, which raises for any overflowed sequence.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    lengths: jax.Array
    mesh: Mesh
    axis: str
    shard_by: str
    overflow: jax.Array | None = None  # bool [B]: a token was dropped because the cache was full

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    @property
    def token_order(self) -> str:
        """Where token p of a sequence is (see `sharded_decode_attention`): sharded by sequence
        the cache is 'striped', so each device holds 1/n of every sequence; by heads each
        device holds whole sequences in order."""
        return "striped" if self.shard_by == "sequence" else "contiguous"

    def in_token_order(self, slots: jax.Array) -> jax.Array:
        """A layer's `keys[i]` or `values[i]` `[B, S, K, H]` with token p at index p."""
        if self.token_order == "contiguous":
            return slots
        return in_token_order(slots, self.mesh.shape[self.axis])

    @property
    def nbytes_per_device(self) -> int:
        """Cache bytes held by each attention device (keys + values, all layers)."""
        shard = self.keys[0].sharding.shard_shape(self.keys[0].shape)
        return 2 * len(self.keys) * int(np.prod(shard)) * self.keys[0].dtype.itemsize

    @staticmethod
    def create(
        mesh: Mesh,
        *,
        num_layers: int,
        batch: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype=jnp.bfloat16,
        axis: str = "attn",
        shard_by: str = "heads",
        lengths=None,
    ) -> KVCache:
        """An empty (or `lengths`-long, zero-filled) cache, allocated directly in its shards.

        `lengths`: None (all 0) or integers `[batch]` in [0, capacity] (ValueError otherwise).
        """
        sizes = dict(
            num_layers=num_layers, batch=batch, capacity=capacity, kv_heads=kv_heads,
            head_dim=head_dim,
        )  # fmt: skip
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
                raise ValueError(f"KVCache.create: {name} must be an int >= 1, got {size!r}")
        shape = (batch, capacity, kv_heads, head_dim)
        check_shardable(shape, mesh, axis, shard_by)
        sharding = NamedSharding(mesh, cache_spec(shard_by, axis))
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        if lengths is None:
            lengths = np.zeros(batch, np.int32)
        else:
            given = np.asarray(lengths)
            if given.shape != (batch,) or given.dtype.kind not in "iu":
                raise ValueError(
                    f"KVCache.create: lengths must be integers of shape [batch] = ({batch},), "
                    f"got {given.dtype} {given.shape}"
                )
            if (given < 0).any() or (given > capacity).any():
                raise ValueError(
                    f"KVCache.create: lengths must lie in [0, capacity = {capacity}], got "
                    f"{given.tolist()}"
                )
            lengths = given.astype(np.int32)
        replicated = NamedSharding(mesh, P())
        return KVCache(
            keys=tuple(zeros() for _ in range(num_layers)),
            values=tuple(zeros() for _ in range(num_layers)),
            # From host arrays: every process of a multi-controller mesh passes the same
            # values (a device array here became one JAX 0.11 could not read back per shard
            # on 2 processes x 1 GPU).
            lengths=jax.device_put(np.asarray(lengths, np.int32), replicated),
            mesh=mesh,
            axis=axis,
            shard_by=shard_by,
            overflow=jax.device_put(np.zeros(batch, bool), replicated),
        )

    def check(self) -> None:
        """Raise ValueError if a token was ever dropped because a sequence's cache was full
        (the `overflow` flags set under a trace); a host read of `[B]` bools."""
        if self.overflow is None:
            return
        flags = _host_lengths(self.overflow)
        if flags is None:
            raise ValueError("KVCache.check() reads the overflow flags: call it outside jit")
        if flags.any():
            raise ValueError(
                f"KV cache overflow: sequences {np.flatnonzero(flags).tolist()} were full "
                f"(capacity {self.capacity}) when a token was appended; it was dropped"
            )

    def _check_room(self, what: str) -> None:
        """Eagerly (concrete lengths): ValueError when a sequence has no free slot."""
        lengths = _host_lengths(self.lengths)
        if lengths is not None and (lengths >= self.capacity).any():
            raise ValueError(
                f"{what}: KV cache full: lengths {lengths.tolist()} with capacity "
                f"{self.capacity} (sequences {np.flatnonzero(lengths >= self.capacity).tolist()} "
                "have no free slot)"
            )

    def token_sharding(self) -> NamedSharding:
        """Where a step's new k/v `[B, K, H]` (and q `[B, N, H]`) go on the attention mesh."""
        spec = P(None, self.axis, None) if self.shard_by == "heads" else P()
        return NamedSharding(self.mesh, spec)


def _write(cache: jax.Array, new: jax.Array, lengths: jax.Array, axis: str, shard_by: str):
    """Inside shard_map: write new[b] at slot lengths[b] of this device's cache slice, if it
    owns that slot (a scatter with mode='drop': other devices and full caches write nothing)."""
    local_capacity = cache.shape[1]
    pos = lengths
    if shard_by == "sequence":  # striped: token p on device p mod n, at local slot p div n
        n = lax.axis_size(axis)
        pos = jnp.where(lengths % n == lax.axis_index(axis), lengths // n, local_capacity)
    pos = jnp.where((pos >= 0) & (pos < local_capacity), pos, local_capacity)
    return cache.at[jnp.arange(cache.shape[0]), pos].set(new.astype(cache.dtype), mode="drop")


def _append_fn(cache: KVCache, layer: int, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    axis, shard_by = cache.axis, cache.shard_by
    spec = cache_spec(shard_by, axis)
    token_spec = P(None, axis, None) if shard_by == "heads" else P()
    write = jax.shard_map(
        functools.partial(_write, axis=axis, shard_by=shard_by),
        mesh=cache.mesh,
        in_specs=(spec, token_spec, P()),
        out_specs=spec,
        check_vma=False,
    )
    keys, values = list(cache.keys), list(cache.values)
    k_new, v_new = _placed(cache.mesh, (token_spec, token_spec), (k_new, v_new))
    keys[layer] = write(keys[layer], k_new, cache.lengths)
    values[layer] = write(values[layer], v_new, cache.lengths)
    return dataclasses.replace(
        cache, keys=tuple(keys), values=tuple(values), overflow=_overflowed(cache)
    )


def _overflowed(cache: KVCache) -> jax.Array:
    """The sticky overflow flags after a step that writes at slot `lengths`."""
    full = cache.lengths >= cache.capacity
    return full if cache.overflow is None else cache.overflow | full


@functools.partial(jax.jit, static_argnames="layer", donate_argnums=0)
def _append(cache: KVCache, layer: int, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    return _append_fn(cache, layer, k_new, v_new)


def append(cache: KVCache, layer: int, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    """Write one token per sequence (`[B, K, H]`) at slot `lengths[b]` of `layer`, in place.

    The cache is donated: its buffers are reused, so do not touch the old `cache` afterwards.
    Lengths do not change: call `advance` once all layers have their token. A full sequence
    (lengths == S) raises ValueError when the lengths are concrete; under a trace its token is
    dropped and `cache.overflow[b]` is set (see `KVCache`).
    """
    cache._check_room("append")
    token = cache.token_sharding().spec
    k_new, v_new = _onto_mesh(cache.mesh, (token, token), (k_new, v_new))
    return _append(cache, layer, k_new, v_new)


@functools.partial(jax.jit, donate_argnums=0)
def _advance(cache: KVCache) -> KVCache:
    return dataclasses.replace(
        cache,
        lengths=jnp.minimum(cache.lengths + 1, cache.capacity),
        overflow=_overflowed(cache),
    )


def advance(cache: KVCache) -> KVCache:
    """lengths += 1: the step's token is now part of every layer. A full sequence raises
    ValueError when the lengths are concrete; under a trace its length stays at the capacity
    and `cache.overflow[b]` is set."""
    cache._check_room("advance")
    return _advance(cache)


def append_and_attend(
    cache: KVCache,
    layer: int,
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    implementation: str | None = None,
) -> tuple[KVCache, jax.Array]:
    """One layer on the attention devices: append the token's k/v, then attend over lengths + 1.

    q `[B, N, H]`, k_new/v_new `[B, K, H]`, ideally already on `cache.token_sharding()`.
    Returns the updated (donated) cache and the attention output `[B, N, H]`. A full sequence
    raises ValueError when the lengths are concrete; under a trace its token is dropped, it
    attends over the S cached tokens, and `cache.overflow[b]` is set (see `KVCache`).
    """
    cache._check_room("append_and_attend")
    token = cache.token_sharding().spec
    q, k_new, v_new = _onto_mesh(cache.mesh, (token,) * 3, (q, k_new, v_new))
    return _append_and_attend(cache, layer, q, k_new, v_new, implementation=implementation)


@functools.partial(jax.jit, static_argnames=("layer", "implementation"), donate_argnums=0)
def _append_and_attend(
    cache: KVCache,
    layer: int,
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    implementation: str | None = None,
) -> tuple[KVCache, jax.Array]:
    cache = _append_fn(cache, layer, k_new, v_new)
    lengths = jnp.minimum(cache.lengths + 1, cache.capacity)
    out = _sharded(
        q,
        cache.keys[layer],
        cache.values[layer],
        lengths,
        mesh=cache.mesh,
        axis=cache.axis,
        shard_by=cache.shard_by,
        scale=None,
        logits_soft_cap=None,
        return_residual=False,
        implementation=implementation,
        config=None,
        token_order=cache.token_order,
    )
    return cache, out
