"""`jattn.dot_product_attention`: argument checks, then dispatch to an implementation.

Implementations live in a small registry. Each takes the validated `AttentionArgs` and either
returns `(out, lse)` or raises `NotImplementedError` naming why it cannot serve the call; auto
selection (`implementation=None`) tries them in order and falls through on a decline, so no
feature is ever silently dropped. Kernels (`triton`, `mosaic`) register themselves here.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax._src import core as _core  # tracer types: which autodiff traces a call
from jax._src.interpreters import ad as _ad
from jax._src.interpreters import batching as _batching
from jax._src.interpreters import partial_eval as _pe
from jaxtyping import ArrayLike

from jattn import chunked, reference
from jattn.autotune import cache as autotune_cache
from jattn.autotune import dispatch as autotune_dispatch

SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
IMPLEMENTATIONS = ("mosaic", "triton", "cudnn", "xla_chunked", "xla")
# Appended to shape errors: a [B, N, T, H] array (PyTorch's layout) is the common mistake.
LAYOUT_HINT = (
    "jattn takes the [B, T, N, H] layout of jax.nn.dot_product_attention (sequence on axis 1, "
    "heads on axis 2), not [B, N, T, H]"
)


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    """A validated call: rank-4 arrays, canonical option values.

    Shapes: query `[B, T, N, H]`, key/value `[B, S, K, H]`, bias/mask rank 4 broadcastable to
    `[B, N, T, S]` (their head axis is 1 or N), lengths and q_offset int32 `[B]`.
    """

    query: Array
    key: Array
    value: Array
    bias: Array | None
    mask: Array | None
    scale: float
    is_causal: bool
    query_seq_lengths: Array | None
    key_value_seq_lengths: Array | None
    local_window_size: tuple[int, int] | None
    q_offset: Array | None
    segment_ids: tuple[Array, Array] | None
    logits_soft_cap: float | None
    # False: the caller drops the lse, so an implementation may skip it (cuDNN then runs its
    # inference forward, which writes no softmax statistics) and return any [B, T, N] array.
    lse_needed: bool = True

    @property
    def shape_summary(self) -> str:
        return f"query {self.query.shape}, key {self.key.shape}, dtype {self.query.dtype}"


# An implementation: (args, config) -> (out [B, T, N, H], lse [B, T, N] float32), or raises
# NotImplementedError("<why>") when it cannot serve the call.
Implementation = Callable[[AttentionArgs, Any], tuple[Array, Array]]
_REGISTRY: dict[str, Implementation] = {}
_CONFIG_TYPES: dict[str, type | None] = {}  # the Config class each implementation takes


def register_implementation(name: str, fn: Implementation, config_type: type | None = None) -> None:
    """Make `fn` available as `implementation=name` (kernels call this when imported);
    `config_type`: the Config dataclass it takes (None: it takes no config)."""
    _REGISTRY[name] = fn
    _CONFIG_TYPES[name] = config_type


# A backward at given residuals: (args, config, out, lse, d_out, d_lse) -> (dq, dk, dv), with
# out/lse those of the forward over args' keys or of any attention whose keys include them (a
# ring's merged output: the block gradients are then its share); NotImplementedError as above.
Backward = Callable[..., tuple[Array, Array, Array]]
_BACKWARDS: dict[str, Backward] = {}


def register_backward(name: str, fn: Backward) -> None:
    """Give implementation `name` a backward that takes the residuals (out, lse) as inputs
    (`attention_backward`); kernels with their own backward kernels call this."""
    _BACKWARDS[name] = fn


def attention_backward(
    args: AttentionArgs, implementation, config, out, lse, d_out, d_lse
) -> tuple[Array, Array, Array] | None:
    """(dq, dk, dv) of attention over `args` at residuals computed elsewhere, by the first
    implementation in `implementation`'s order (as `_dispatch` walks it) that has a
    `register_backward` and serves the call; None when none does (the caller then
    differentiates the forward instead). No bias or mask (they have no residual backward).

    out `[B, T, N, H]`, lse `[B, T, N]` float32 (+inf on rows that see no key anywhere: their
    probabilities are then 0), d_out like out, d_lse like lse. For the true out and lse of
    `args` this equals the vjp of `dot_product_attention(..., return_residual=True)`; for the
    merged out and lse of a larger attention whose keys include `args.key` (ring attention),
    it is this block's share of that attention's gradients: P = exp(logits - lse) is then the
    block's slice of the whole row's softmax (FlashAttention-2's backward, Dao 2023, Alg. 2).
    """
    if args.bias is not None or args.mask is not None:
        return None
    if implementation is None:
        names = auto_order_for(args, differentiated=True)
    else:
        names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    names = _check_config(names, config, auto=implementation is None)
    for name in names:
        if name in _BACKWARDS:
            try:
                return _BACKWARDS[name](args, config, out, lse, d_out, d_lse)
            except NotImplementedError:
                continue
    return None


def _check_config(names: tuple[str, ...], config, auto: bool) -> tuple[str, ...]:
    """The implementations to try with `config`: a config belongs to one kernel, so another
    kernel's config is a ValueError naming both types (auto tries only its owner)."""
    if config is None:
        return names
    kind = type(config).__name__
    owners = [n for n, t in _CONFIG_TYPES.items() if t is not None and isinstance(config, t)]
    if not owners:
        takes = sorted({t.__name__ for t in _CONFIG_TYPES.values() if t is not None})
        raise ValueError(f"config must be one of {', '.join(takes)} (or None), got a {kind}")
    if auto:
        served = tuple(name for name in names if name in owners)
        if not served:
            raise ValueError(
                f"config is a {kind}, the config of implementation {owners[0]!r}, which "
                f"implementation=None does not try here (it tries {names}); pass "
                f"implementation={owners[0]!r}"
            )
        return served
    for name in names:
        if name in _CONFIG_TYPES and name not in owners:
            wanted = _CONFIG_TYPES[name]
            takes = "takes no config" if wanted is None else f"takes a {wanted.__name__}"
            raise ValueError(
                f"implementation {name!r} {takes}, got a {kind} (the config of "
                f"implementation {owners[0]!r})"
            )
    return names


def available_implementations() -> tuple[str, ...]:
    """The registered implementation names, in auto-selection order."""
    return tuple(name for name in IMPLEMENTATIONS if name in _REGISTRY)


def hopper_or_newer() -> bool:
    """Whether the first device is an NVIDIA GPU of compute capability 9.0 (Hopper) or newer."""
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return tuple(int(part) for part in str(capability).split(".")[:2]) >= (9, 0)


def auto_order(platform: str | None = None) -> tuple[str, ...]:
    """What `implementation=None` tries, in order, on this platform.

    Hopper and newer (sm_90+): cudnn, mosaic, triton. Measured on an H100 (bf16, T = 512..16k,
    `benchmarks/results/flash_mosaic_h100_bf16.json`), cuDNN is ahead of the Mosaic GPU kernel in
    most cells (its forward is 0.8-0.96x of the best peer) and the Mosaic kernel is ~1.4x the
    Triton one; mosaic serves what cuDNN declines in 16-bit (soft cap, segments, q_offset, odd
    head dims), triton what both decline (float32). A call's own bucket can reorder the kernels
    where a dispatch table was measured on the GPU (`auto_order_for`: the H200's puts mosaic
    first for most causal forwards at H >= 128). Other CUDA GPUs: triton, cudnn. Then XLA.
    Off the GPU: xla_chunked (O(T) memory), then xla; the Pallas kernels run there only in
    interpret mode, so only an explicit request gets them.
    """
    platform = platform or jax.default_backend()
    if platform != "gpu":
        order = ("xla_chunked", "xla")
    elif hopper_or_newer():
        order = ("cudnn", "mosaic", "triton", "xla_chunked", "xla")
    else:
        order = ("triton", "cudnn", "xla_chunked", "xla")
    return tuple(name for name in order if name in _REGISTRY)


def auto_order_for(args: AttentionArgs, *, differentiated: bool) -> tuple[str, ...]:
    """`auto_order()`, with the kernels this GPU's shipped dispatch table measured for the
    call's bucket moved to the front, fastest first (`jattn.autotune.dispatch`; the H200 table
    comes from `benchmarks/results/flash_h200_bf16_*.json`). differentiated: the call is under
    reverse-mode autodiff, so the forward+backward measurements rank it.

    A call with a dense bias or mask puts mosaic first instead: the tables measured plain
    attention, and cuDNN reads a dense bias far slower (H200, bf16, 16 heads x 128, T = 4k, ms
    forward / forward+backward: mosaic 1.33 / 5.18, cuDNN 2.03 / 9.19, tokamax 1.33 / 5.41;
    `benchmarks/results/flash_features_h200.json`)."""
    order = auto_order()
    if jax.default_backend() != "gpu" or not hopper_or_newer():
        return order
    if args.bias is not None or args.mask is not None:
        return autotune_dispatch.merge(("mosaic",), order)
    measured = autotune_dispatch.measured_order(
        device=autotune_cache.device_kind(),
        dtype=args.query.dtype,
        head_dim=args.query.shape[-1],
        causal=args.is_causal,
        length=max(args.query.shape[1], args.key.shape[1]),
        differentiated=differentiated,
    )
    return autotune_dispatch.merge(measured, order)


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    return_residual: bool = False,
    q_offset: int | ArrayLike | None = None,
    segment_ids: tuple[ArrayLike, ArrayLike] | None = None,
    logits_soft_cap: float | None = None,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention: a superset of `jax.nn.dot_product_attention`.

    Any call `jax.nn.dot_product_attention` accepts gives its result (within dtype tolerance) on
    every query row that sees at least one key; switching is a change of import.

    Args:
      query: `[B, T, N, H]` (or `[T, N, H]`).
      key, value: `[B, S, K, H]` (or `[S, K, H]`); N % K == 0. Query head n uses kv head
        n // (N // K) (GQA; K == 1 is MQA).
      bias: additive, rank <= 4, broadcastable to `[B, N, T, S]` (head axis 1 or N). A boolean
        or integer bias is added as numbers (True = 1), as jax.nn adds it.
      mask: boolean, True = attend; same shapes as bias.
      scale: logits = scale * q.k; default H ** -0.5. A traced scalar (a learned temperature
        under jit) is folded into the query, so it is differentiable too.
      is_causal: query i sees key j only if j <= i + q_offset (top-left aligned by default).
      query_seq_lengths: `[B]` in [0, T]: query rows i >= length are padding and get output 0.
      key_value_seq_lengths: `[B]` in [0, S]: keys j >= length are padding; whatever they hold
        (NaN, inf) never reaches a result. Lengths out of range raise ValueError when concrete
        and are clamped into range when traced (the rule of `decode_attention`).
      local_window_size: `(left, right)` or an int w for `(w, w)`:
        i + q_offset - left <= j <= i + q_offset + right.
      return_residual: also return the log-sum-exp `[B, T, N]` of the masked logits (in the
        query dtype, as jax.nn returns it; computed in float32).
      q_offset: int or `[B]`: absolute position of query row 0 for the causal and window masks;
        any int32 value (positions are compared without overflow, so 2**31 - 1 with causal sees
        every key). Integer arguments wider than int32 must fit it (ValueError when concrete;
        traced ones saturate, never wrap).
        `q_offset = S - T` aligns causal attention bottom-right (chunked prefill); decode is
        T = 1, q_offset = length - 1::

          T=2, S=4, is_causal:   q_offset=0      q_offset=2 (= S - T)
                                 1 0 0 0         1 1 1 0
                                 1 1 0 0         1 1 1 1

      segment_ids: `(q_ids [B, T], kv_ids [B, S])`: packed sequences; a query sees only keys
        with its own id.
      logits_soft_cap: c: logits = c * tanh(logits / c), applied before the bias.
      implementation: None (auto), one of 'mosaic', 'triton', 'cudnn', 'xla_chunked', 'xla',
        or a sequence of them to try in order.
      config: the chosen implementation's Config (e.g. `jattn.ChunkedConfig`); None = default.

    Returns:
      `[B, T, N, H]` in the query dtype (and lse `[B, T, N]` with `return_residual`).
      A row that sees no key returns 0, lse -inf and zero gradients (jax.nn: the mean of V);
      so does S = 0. Empty T, B, N or H give empty results. A key that holds NaN/inf reaches
      only the rows that see it (their output and lse are NaN), never a row it is hidden from
      ('mosaic' cleans the K and V of tiles that hide keys before multiplying them). The
      exception: cuDNN's kernel (not checked) may let a NaN in a key hidden by causal, a window,
      segment ids or a mask reach the other rows of its tile through 0 * NaN in P V. Keys past
      `key_value_seq_lengths` (an uninitialised cache) are zeroed before the cuDNN and Mosaic
      kernels and never reach a row.

    Autodiff: reverse mode (jax.grad, jax.vjp) runs each implementation's own backward (a
    custom_vjp). Forward mode (jax.jvp, jax.jacfwd, jax.hessian) and second derivatives (grad of
    grad) are served by 'xla_chunked' differentiated as plain JAX (auto picks it then) and by
    'xla'; the kernels ('triton', 'mosaic', 'cudnn') raise NotImplementedError naming them.
    The choice is read from the input tracers, so a jit between this call and the jvp
    (`jax.jvp(jax.jit(f))`) hides it: there pass `implementation='xla'` (or jit the jvp).

    Raises:
      ValueError: bad ranks, shapes or dtypes, naming the shapes; checked before any tracing.
      NotImplementedError: no requested implementation can serve the call (with each reason).

    Example:
      >>> x = jnp.ones((1, 3, 2, 4))  # [B, T, N, H]
      >>> out = dot_product_attention(x, x, x, key_value_seq_lengths=jnp.array([0]))
      >>> float(jnp.abs(out).max())  # no key to see: 0, where jax.nn returns the mean of V
      0.0
    """
    unbatched = jnp.ndim(query) == 3
    traced_scale = None
    if scale is not None and concrete_value(scale) is None:
        traced_scale, scale = _check_traced_scale(scale), 1.0
    args = check_attention_args(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        q_offset=q_offset,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
    )
    if traced_scale is not None:  # scale * (q . k) == (scale * q) . k
        q = args.query
        scaled = q.astype(jnp.promote_types(q.dtype, jnp.float32)) * traced_scale
        args = dataclasses.replace(args, query=scaled.astype(q.dtype))
    args = dataclasses.replace(args, lse_needed=bool(return_residual))
    out, lse = _run(args, implementation, config)
    lse = lse.astype(out.dtype)  # jax.nn returns the lse in the input dtype
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out


def _check_traced_scale(scale) -> Array:
    scale = jnp.asarray(scale)
    if scale.ndim != 0 or not (
        jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer)
    ):
        raise ValueError(f"scale must be a real scalar, got {scale.dtype}{list(scale.shape)}")
    return scale


# The arrays of AttentionArgs; every other field is static (it keys the compiled function).
_ARRAY_FIELDS = (
    "query",
    "key",
    "value",
    "bias",
    "mask",
    "query_seq_lengths",
    "key_value_seq_lengths",
    "q_offset",
    "segment_ids",
)


def _run(args: AttentionArgs, implementation, config) -> tuple[Array, Array]:
    """`_dispatch` under one jit per static signature: an eager call compiles once per shape
    and option set instead of re-tracing every scan and kernel on every call."""
    forward, reverse = _autodiff_levels(args)
    if forward or reverse > 1:  # a jit here would hide the tracers that pick the implementation
        return _dispatch(args, implementation, config)
    if not isinstance(implementation, str | None):
        implementation = tuple(implementation)
    static = tuple(
        (field.name, getattr(args, field.name))
        for field in dataclasses.fields(args)
        if field.name not in _ARRAY_FIELDS
    )
    try:
        hash((static, implementation, config))
    except TypeError:  # an unhashable config: let the implementation say what is wrong
        return _dispatch(args, implementation, config, differentiated=reverse == 1)
    arrays = {name: getattr(args, name) for name in _ARRAY_FIELDS}
    # config=None is resolved from the autotune cache while tracing: a cache written since
    # (jattn autotune, autotune.save) must give a new trace, not the first one's tiles.
    tuning = autotune_cache.state() if config is None else None
    differentiated = reverse == 1  # the jit hides the tracers: auto's bucket needs it now
    return _dispatch_jit(arrays, static, implementation, config, tuning, differentiated)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _dispatch_jit(
    arrays, static, implementation, config, tuning, differentiated
) -> tuple[Array, Array]:
    del tuning  # only a key of the jit cache
    args = AttentionArgs(**arrays, **dict(static))
    return _dispatch(args, implementation, config, differentiated=differentiated)


def _autodiff_levels(args: AttentionArgs) -> tuple[bool, int]:
    """(forward, reverse): whether forward-mode autodiff (jax.jvp, jacfwd, hessian) traces the
    call's differentiable arrays, and how many reverse-mode levels (jax.grad, vjp) are nested
    around them. Read from the tracers, so it sees transformations applied outside this call
    but not ones applied to a jit that contains it (`jax.jvp(jax.jit(f))`)."""
    forward, reverse = False, 0
    for x in jax.tree.leaves((args.query, args.key, args.value, args.bias)):
        levels = 0
        while isinstance(x, _core.Tracer):
            if isinstance(x, _ad.JVPTracer):
                if isinstance(x.tangent, _pe.JaxprTracer):  # jax_use_direct_linearize off: grad
                    levels += 1
                else:
                    forward = True
                x = x.primal
            elif isinstance(x, _ad.LinearizeTracer):  # jax.grad, jax.vjp, jax.linearize
                levels += 1
                x = x.primal
            elif isinstance(x, _batching.BatchTracer):
                x = x.val
            else:  # jit, shard_map, ...: the tracers of what is traced around it
                break
        reverse = max(reverse, levels)
    return forward, reverse


def _higher_order(name: str, forward: bool) -> Implementation:
    """What serves `implementation=name` under forward mode or nested reverse mode: xla and
    xla_chunked (differentiated as plain JAX); the kernels' custom_vjp differentiates once."""
    if name == "xla":
        return _xla
    if name == "xla_chunked":
        return _xla_chunked_autodiff if forward else _xla_chunked

    def decline(args, config):
        mode = (
            "forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian)"
            if forward
            else "a second derivative (grad of grad)"
        )
        raise NotImplementedError(
            f"jattn: implementation {name!r} differentiates in reverse mode, once (a custom_vjp "
            f"around its own backward), so it cannot serve {mode}; use implementation="
            "'xla_chunked' (O(T) memory) or 'xla', which implementation=None picks here"
        )

    return decline


def _dispatch(
    args: AttentionArgs, implementation, config, *, differentiated: bool = False
) -> tuple[Array, Array]:
    if implementation is None:
        names = auto_order_for(args, differentiated=differentiated)
    elif isinstance(implementation, str):
        names = (implementation,)
    else:
        names = tuple(implementation)
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"Unknown implementation {name!r}; choose from {IMPLEMENTATIONS}.")
    names = _check_config(names, config, auto=implementation is None)
    if 0 in args.query.shape or 0 in args.key.shape:
        # Nothing for a kernel to tile (S = 0: every row sees nothing, so output 0 and lse
        # -inf; T, B, N or H = 0: empty results): every implementation answers the same.
        return _xla(args, None)
    forward, reverse = _autodiff_levels(args)
    args = _zero_queries_past_lengths(args)
    reasons = []
    for name in names:
        if name not in _REGISTRY:
            reasons.append(f"{name}: not available in this version of jattn")
            continue
        try:
            if forward or reverse > 1:
                return _higher_order(name, forward)(args, config)
            if name == "mosaic":  # its kernel lets a NaN past the lengths in as 0 * NaN
                return _REGISTRY[name](zero_keys_past_lengths(args), config)
            return _REGISTRY[name](args, config)
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
    raise NotImplementedError(
        f"No implementation can serve this call ({args.shape_summary}):\n  " + "\n  ".join(reasons)
    )


def zero_keys_past_lengths(args: AttentionArgs) -> AttentionArgs:
    """args with the keys and values past `key_value_seq_lengths` set to 0.

    Slots past a length are often uninitialised cache memory. They are hidden from every query,
    so zeroing them changes no result, and a kernel whose P.V multiplies hidden keys by 0 can
    then not turn their NaN into 0 * NaN = NaN (cuDNN; the Mosaic kernel cleans only the tiles
    that causal, a window, segment ids or a mask hide keys in: `mosaic_common.clean_tile`).
    """
    if args.key_value_seq_lengths is None:
        return args
    past = jnp.arange(args.key.shape[1])[None, :] >= args.key_value_seq_lengths[:, None]
    past = past[:, :, None, None]  # [B, S, 1, 1]
    key, value = (jnp.where(past, jnp.zeros((), x.dtype), x) for x in (args.key, args.value))
    return dataclasses.replace(args, key=key, value=value)


def _zero_queries_past_lengths(args: AttentionArgs) -> AttentionArgs:
    """Query rows past `query_seq_lengths` set to 0: they see no key, so nothing changes, but a
    NaN there can no longer reach dk, dv of the keys through dS^T q as 0 * NaN."""
    if args.query_seq_lengths is None:
        return args
    past = jnp.arange(args.query.shape[1])[None, :] >= args.query_seq_lengths[:, None]
    zero = jnp.zeros((), args.query.dtype)
    return dataclasses.replace(args, query=jnp.where(past[:, :, None, None], zero, args.query))


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _check_broadcast_4d(x, name: str, full: tuple[int, int, int, int]) -> Array:
    """bias / mask: rank <= 4, each axis 1 or the full size (head axis: 1 or N)."""
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(
            f"{name} must have rank <= 4 (broadcastable to [B, N, T, S] = {full}), "
            f"got shape {x.shape}"
        )
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    for size, want in zip(x.shape, full, strict=True):
        if size not in (1, want):
            raise ValueError(
                f"{name} of shape {x.shape} does not broadcast to [B, N, T, S] = "
                f"{full} (each axis must be 1 or the full size)"
            )
    return x


_INT32 = np.iinfo(np.int32)


def _as_int32(x, name: str) -> Array:
    """An integer array as int32, never wrapped: wider integers (int64, uint32, Python ints) are
    range-checked when concrete (ValueError) and saturated when traced."""
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {dtype}")
    if np.can_cast(dtype, np.int32):
        return jnp.asarray(x).astype(jnp.int32)
    known = concrete_value(x)
    if known is None:  # traced (int64 only exists with jax_enable_x64): saturate, never wrap
        return jnp.clip(x, _INT32.min, _INT32.max).astype(jnp.int32)
    if known.size and (known.min() < _INT32.min or known.max() > _INT32.max):
        raise ValueError(
            f"{name} must fit int32 [{_INT32.min}, {_INT32.max}] (jattn computes positions and "
            f"ids in int32), got values in [{known.min()}, {known.max()}]"
        )
    return jnp.asarray(known.astype(np.int32))


def _check_batch_ints(x, name: str, batch: int, allow_scalar: bool = False) -> Array | None:
    if x is None:
        return None
    x = _as_int32(x, name)
    if x.shape != (batch,) and not (allow_scalar and x.ndim == 0):
        raise ValueError(f"{name} must have shape [B] = ({batch},), got {x.shape}")
    return jnp.broadcast_to(x, (batch,))


def _check_seq_lengths(x, name: str, batch: int, axis: str, limit: int) -> Array | None:
    """Lengths in [0, limit]: a concrete value out of range raises (checked before the int32
    cast, so 2**32 + 3 cannot wrap to 3); a traced one is clamped into range, as
    `decode_attention` clamps its lengths, the same for every implementation."""
    if x is None:
        return None
    known = concrete_value(x)
    if known is not None and np.issubdtype(known.dtype, np.integer) and known.size:
        if (known < 0).any() or (known > limit).any():
            raise ValueError(f"{name} must lie in [0, {axis} = {limit}], got {known.tolist()}")
    return jnp.clip(_check_batch_ints(x, name, batch), 0, limit)


def concrete_value(x) -> np.ndarray | None:
    """x as a NumPy array when its value is known at trace time, None for a traced value."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _static_number(x, name: str) -> float | None:
    """A Python float from a number or a concrete 0-d array; kernels specialise on the value."""
    if x is None:
        return None
    value = concrete_value(x)
    if value is None:
        raise ValueError(
            f"{name} must be concrete (a number), got a traced value: close over it "
            "or mark it static instead of passing it through jit as an argument"
        )
    if value.dtype.kind not in "iuf":  # strings, bools, complex, objects
        raise ValueError(f"{name} must be a real number, got {x!r}")
    if value.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _is_bool(x) -> bool:
    return isinstance(x, bool | np.bool_)


def _static_bool(x, name: str) -> bool:
    """A Python bool from a bool or a concrete 0-d boolean array (not 'no', not 1)."""
    value = None if isinstance(x, str) else concrete_value(x)
    if value is None or value.dtype != np.bool_ or value.ndim != 0:
        raise ValueError(f"{name} must be a bool (True or False, not traced), got {x!r}")
    return bool(value)


def _canonical_positions(
    q_offset: Array | None,  # [B] int32
    window: tuple[int, int] | None,
    *,
    is_causal: bool,
    q_len: int,
    kv_len: int,
) -> tuple[Array | None, tuple[int, int] | None]:
    """(q_offset, window) with the same causal and window masks, every value within a few times
    T + S, so no implementation's position arithmetic can overflow int32.

    The masks compare d = j - i (in [-(T - 1), S - 1]) with a = q_offset - left (key j visible
    only if d >= a) and b = q_offset + right (d <= b; right is 0 under causal). Clamping a and b
    to [-T, S] changes no mask; windows wider than T + S are clamped to it, and q_offset is
    chosen so that the clamped window reproduces the clamped a and b exactly (when a window is
    wider than T + S, at most one of its sides binds on any row). The sums are computed
    saturated, so q_offset = 2**31 - 1 with causal sees every key, as it should.
    """
    if window is None and not is_causal:
        return None, None  # q_offset moves only the causal and window masks
    span = q_len + kv_len
    clamped = None if window is None else (min(window[0], span), min(window[1], span))
    if q_offset is None:
        return None, clamped  # a = -left, b = right: within [-span, span] once clamped
    right = 0 if is_causal else window[1]

    def threshold(c: int) -> Array:  # clamp(q_offset + c, -T, S), exactly, for any Python int c
        low, high = -q_len, kv_len
        if high - c < _INT32.min or low - c > _INT32.max:  # q_offset + c is beyond [-T, S]
            return jnp.full(q_offset.shape, high if high - c < _INT32.min else low, jnp.int32)
        q = jnp.clip(q_offset, max(low - c, _INT32.min), min(high - c, _INT32.max))
        wrapped = (c - _INT32.min) % 2**32 + _INT32.min  # c mod 2**32: q + c is in range
        return q + jnp.asarray(wrapped, jnp.int32)

    upper = threshold(right)
    if window is None:
        return upper, None  # causal alone: q_offset' = b
    lower = threshold(-window[0])
    left_, right_ = clamped[0], 0 if is_causal else clamped[1]
    offset = jnp.where(
        lower > -q_len,  # the left side binds (or hides every key)
        lower + left_,
        jnp.where(upper < kv_len, upper - right_, kv_len - right_),
    )
    return offset.astype(jnp.int32), clamped


def check_attention_args(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    q_offset=None,
    segment_ids=None,
    logits_soft_cap=None,
) -> AttentionArgs:
    """Validate a `dot_product_attention` call; raise ValueError naming the shapes."""
    shapes = f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
    if not (np.ndim(query) == np.ndim(key) == np.ndim(value)) or np.ndim(query) not in (3, 4):
        raise ValueError(
            f"query, key and value must all be rank 4 [B, T|S, N|K, H] (or all "
            f"rank 3 without B); got {shapes}. {LAYOUT_HINT}"
        )
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if query.ndim == 3:
        query, key, value = query[None], key[None], value[None]
    batch, q_len, num_heads, head_dim = query.shape
    _, kv_len, num_kv_heads, _ = key.shape
    if key.shape != value.shape:
        raise ValueError(
            f"key and value must have the same shape [B, S, K, H]; got {shapes}. {LAYOUT_HINT}"
        )
    if key.shape[0] != batch:
        raise ValueError(
            f"query [B, T, N, H] and key [B, S, K, H] disagree on the batch size B; got "
            f"{shapes}. {LAYOUT_HINT}"
        )
    if key.shape[3] != head_dim:
        raise ValueError(
            f"query [B, T, N, H] and key [B, S, K, H] disagree on the head dim H; got "
            f"{shapes}. {LAYOUT_HINT}"
        )
    if head_dim == 0:  # no default scale (H ** -0.5) and nothing to attend with
        raise ValueError(f"the head dim H must be >= 1; got {shapes}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"query heads N (axis 2 of query [B, T, N, H]) must be a multiple of kv heads K "
            f"(axis 2 of key [B, S, K, H]; GQA), and K >= 1; got {shapes}. {LAYOUT_HINT}"
        )
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) != 1 or query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"query, key and value must share one dtype among float16, bfloat16, "
            f"float32, float64; got {query.dtype}, {key.dtype}, {value.dtype} "
            f"({shapes})"
        )
    full = (batch, num_heads, q_len, kv_len)
    if bias is not None:
        bias = _check_broadcast_4d(bias, "bias", full)
        if bias.dtype == jnp.bool_ or jnp.issubdtype(bias.dtype, jnp.integer):
            bias = bias.astype(query.dtype)  # added as numbers, as jax.nn does (True = 1)
        elif not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias must be real, got {bias.dtype}")
    if mask is not None:
        mask = _check_broadcast_4d(mask, "mask", full)
        if mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask must be boolean (True = attend), got {mask.dtype}; pass an "
                "additive mask as bias"
            )
    query_seq_lengths = _check_seq_lengths(
        query_seq_lengths, "query_seq_lengths", batch, "T", q_len
    )
    key_value_seq_lengths = _check_seq_lengths(
        key_value_seq_lengths, "key_value_seq_lengths", batch, "S", kv_len
    )
    q_offset = _check_batch_ints(q_offset, "q_offset", batch, allow_scalar=True)
    if segment_ids is not None:
        if not isinstance(segment_ids, tuple | list) or len(segment_ids) != 2:
            raise ValueError("segment_ids must be a pair (q_ids [B, T], kv_ids [B, S])")
        q_ids, kv_ids = (_as_int32(ids, "segment_ids") for ids in segment_ids)
        if q_ids.shape != (batch, q_len) or kv_ids.shape != (batch, kv_len):
            raise ValueError(
                f"segment_ids must have shapes [B, T] = {(batch, q_len)} and "
                f"[B, S] = {(batch, kv_len)}; got {q_ids.shape} and {kv_ids.shape}"
            )
        segment_ids = (q_ids, kv_ids)
    if local_window_size is not None:
        if isinstance(local_window_size, int | np.integer) and not _is_bool(local_window_size):
            local_window_size = (local_window_size, local_window_size)
        window = local_window_size
        window = tuple(window) if isinstance(window, tuple | list | np.ndarray) else ()
        if len(window) != 2 or any(
            not isinstance(w, int | np.integer) or _is_bool(w) or w < 0 for w in window
        ):
            raise ValueError(
                f"local_window_size must be an int >= 0 or a pair (left, right) of "
                f"ints >= 0, got {local_window_size!r}"
            )
        local_window_size = (int(window[0]), int(window[1]))
    logits_soft_cap = _static_number(logits_soft_cap, "logits_soft_cap")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be > 0 (None turns it off), got {logits_soft_cap}")
    scale = _static_number(scale, "scale")
    is_causal = _static_bool(is_causal, "is_causal")
    q_offset, local_window_size = _canonical_positions(
        q_offset, local_window_size, is_causal=is_causal, q_len=q_len, kv_len=kv_len
    )
    return AttentionArgs(
        query=query,
        key=key,
        value=value,
        bias=bias,
        mask=mask,
        scale=head_dim**-0.5 if scale is None else scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        q_offset=q_offset,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
    )


def option_kwargs(args: AttentionArgs) -> dict[str, Any]:
    """The keyword options of a validated call, as the reference and the kernels take them."""
    return dict(
        scale=args.scale,
        is_causal=args.is_causal,
        query_seq_lengths=args.query_seq_lengths,
        key_value_seq_lengths=args.key_value_seq_lengths,
        local_window_size=args.local_window_size,
        q_offset=args.q_offset,
        segment_ids=args.segment_ids,
        logits_soft_cap=args.logits_soft_cap,
    )


def _xla(args: AttentionArgs, config) -> tuple[Array, Array]:
    """The reference itself: materialises `[B, N, T, S]`; fine for short sequences."""
    if config is not None:
        raise NotImplementedError(f"xla takes no config, got {type(config).__name__}")
    return reference.dot_product_attention(
        args.query,
        args.key,
        args.value,
        args.bias,
        args.mask,
        return_residual=True,
        **option_kwargs(args),
    )


def _xla_chunked(args: AttentionArgs, config) -> tuple[Array, Array]:
    if config is None:
        config = chunked.default_config()
    if not isinstance(config, chunked.ChunkedConfig):
        raise NotImplementedError(f"xla_chunked needs a ChunkedConfig, got {type(config).__name__}")
    return chunked.chunked_attention(
        args.query, args.key, args.value, args.bias, args.mask, config=config, **option_kwargs(args)
    )


def _xla_chunked_backward(args: AttentionArgs, config, out, lse, d_out, d_lse):
    if config is None:
        config = chunked.default_config()
    if not isinstance(config, chunked.ChunkedConfig):
        raise NotImplementedError(f"xla_chunked needs a ChunkedConfig, got {type(config).__name__}")
    return chunked.chunked_attention_backward(
        args.query, args.key, args.value, out, lse, d_out, d_lse, config=config,
        **option_kwargs(args),
    )  # fmt: skip


def _xla_chunked_autodiff(args: AttentionArgs, config) -> tuple[Array, Array]:
    """xla_chunked without its custom_vjp: JAX differentiates its scans (forward mode too)."""
    if config is None:
        config = chunked.default_config()
    return chunked.chunked_attention(
        args.query,
        args.key,
        args.value,
        args.bias,
        args.mask,
        config=config,
        autodiff=True,
        **option_kwargs(args),
    )


register_implementation("xla", _xla)
register_implementation("xla_chunked", _xla_chunked, config_type=chunked.ChunkedConfig)
register_backward("xla_chunked", _xla_chunked_backward)
