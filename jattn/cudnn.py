"""`implementation="cudnn"`: cuDNN flash attention through `jax.nn.dot_product_attention`.

Serves what cuDNN serves and declines (NotImplementedError, with the reason) the rest:
float32, head dims that are not a multiple of 8 (or > 256; > 128 before Hopper), q_offset,
segment_ids, soft cap, a right window without causal, and bias with odd T or S (cuDNN's backward
needs them even). Rows that see no key are zeroed here so the result keeps jattn's contract
(cuDNN itself would return whatever its kernel leaves there).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.custom_derivatives import SymbolicZero

from jattn import masking
from jattn.attention import AttentionArgs, register_implementation, zero_keys_past_lengths

_MAX_HEAD_DIM = {True: 256, False: 128}  # by "is Hopper or newer"


def _compute_capability() -> tuple[int, int]:
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    major, minor = str(capability).split(".")[:2]
    return int(major), int(minor)


def _decline_reason(args: AttentionArgs) -> str | None:
    if jax.default_backend() != "gpu":
        return f"cuDNN needs a CUDA GPU; the default backend is {jax.default_backend()}"
    if args.query.dtype not in (jnp.float16, jnp.bfloat16):
        return f"cuDNN flash attention has no {args.query.dtype} path (float16/bfloat16 only)"
    head_dim = args.query.shape[-1]
    max_head_dim = _MAX_HEAD_DIM[_compute_capability() >= (9, 0)]
    if head_dim % 8 or head_dim > max_head_dim:
        return f"cuDNN needs head dim a multiple of 8 and <= {max_head_dim}, got {head_dim}"
    if args.q_offset is not None:
        return "cuDNN (through jax.nn) has no q_offset"
    if args.segment_ids is not None:
        return "cuDNN (through jax.nn) has no segment_ids"
    if args.logits_soft_cap is not None:
        return "cuDNN (through jax.nn) has no logits soft cap"
    if args.local_window_size is not None and args.local_window_size[1] and not args.is_causal:
        return "cuDNN has no right window without causal"
    if args.bias is not None and (args.query.shape[1] % 2 or args.key.shape[1] % 2):
        return "cuDNN's backward with bias needs even T and S"
    return None


def _rows_with_keys(args: AttentionArgs) -> Array:  # [B, N or 1, T] bool
    """Which query rows see at least one key, without building [T, S] unless a mask is given."""
    batch, q_len, _, _ = args.query.shape
    kv_len = args.key.shape[1]
    row = jnp.arange(q_len)[None, :]  # [1, T]
    first = jnp.zeros((1, 1), jnp.int32)  # first visible key, per row
    last = jnp.full((1, 1), kv_len - 1)  # last visible key, per row
    if args.key_value_seq_lengths is not None:
        last = jnp.minimum(last, args.key_value_seq_lengths[:, None] - 1)
    if args.is_causal:
        last = jnp.minimum(last, row)
    if args.local_window_size is not None:
        left, right = args.local_window_size
        first = jnp.maximum(first, row - left)
        last = jnp.minimum(last, row + right)
    ok = first <= last  # [B or 1, T]
    if args.query_seq_lengths is not None:
        ok = ok & (row < args.query_seq_lengths[:, None])
    ok = jnp.broadcast_to(ok, (batch, q_len))[:, None, :]
    if args.mask is not None:
        visible = masking.visible_keys(
            jnp.arange(q_len),
            jnp.arange(kv_len),
            is_causal=args.is_causal,
            q_offset=None,
            local_window_size=args.local_window_size,
            query_seq_lengths=args.query_seq_lengths,
            key_value_seq_lengths=args.key_value_seq_lengths,
            q_segment_ids=None,
            kv_segment_ids=None,
        )[:, None]  # [B or 1, 1, T, S]
        ok = ok & jnp.any(visible & args.mask, axis=-1)
    return ok


def _cudnn(args: AttentionArgs, config) -> tuple[Array, Array]:
    if config is not None:
        raise NotImplementedError(f"cudnn takes no config, got {type(config).__name__}")
    reason = _decline_reason(args)
    if reason is not None:
        raise NotImplementedError(reason)
    # Slots past a length may hold NaN: cuDNN's P.V would let it in as 0 * NaN.
    args = zero_keys_past_lengths(args)
    ok = jnp.moveaxis(_rows_with_keys(args), 1, 2)  # [B, T, N or 1]
    if not args.lse_needed:  # cuDNN's inference forward: no softmax statistics written
        out = _jax_nn(args, args.value, return_residual=False)
        out = jnp.where(ok[..., None], out, 0).astype(args.query.dtype)
        return out, jnp.full(out.shape[:-1], jnp.nan, jnp.float32)
    out, lse = _with_float32_lse(args)
    out = jnp.where(ok[..., None], out, 0).astype(args.query.dtype)
    lse = jnp.where(ok, lax.stop_gradient(lse).astype(jnp.float32), -jnp.inf)
    lse = _lse_with_gradient(args, lse)
    return out, lse


def _window(args: AttentionArgs) -> tuple[int, int] | None:
    window = args.local_window_size
    if window is not None and args.is_causal:
        window = (window[0], 0)  # causal already hides every key right of the query
    return window


def _jax_nn(args: AttentionArgs, value: Array, *, return_residual: bool):
    return jax.nn.dot_product_attention(
        args.query,
        args.key,
        value,
        args.bias,
        args.mask,
        scale=args.scale,
        is_causal=args.is_causal,
        query_seq_lengths=args.query_seq_lengths,
        key_value_seq_lengths=args.key_value_seq_lengths,
        local_window_size=_window(args),
        implementation="cudnn",
        return_residual=return_residual,
    )


def _with_float32_lse(args: AttentionArgs) -> tuple[Array, Array]:  # [B, T, N, H], [B, T, N]
    """cuDNN's output and its float32 softmax statistics. jax.nn's return_residual casts the
    lse to the input dtype: up to 0.03 off at T = 4k in bfloat16 (H200, stop 40), a 3% error in
    the weight exp(lse_a - lse) with which ring attention merges partial outputs. So this calls
    the cuDNN wrapper under jax.nn (`jax._src.cudnn.fused_attention_stablehlo`, the arguments
    jax.nn gives it); where that private function is missing or changed, jax.nn's rounded lse."""
    batch, q_len = args.query.shape[:2]
    kv_len = args.key.shape[1]
    q_lengths, kv_lengths = args.query_seq_lengths, args.key_value_seq_lengths
    padding = q_lengths is not None or kv_lengths is not None
    if padding:
        q_lengths = jnp.full((batch,), q_len, jnp.int32) if q_lengths is None else q_lengths
        kv_lengths = jnp.full((batch,), kv_len, jnp.int32) if kv_lengths is None else kv_lengths
    name = "_".join(["PADDING"] * padding + ["CAUSAL"] * args.is_causal) or "NO_MASK"
    try:
        from jax._src.cudnn import fused_attention_stablehlo as stablehlo

        mask_type = getattr(stablehlo.MaskType, name)
    except (ImportError, AttributeError):
        return _jax_nn(args, args.value, return_residual=True)
    window = _window(args)
    try:
        out, lse = stablehlo.dot_product_attention(
            args.query,
            args.key,
            args.value,
            args.bias,
            args.mask,
            q_seqlen=q_lengths,
            kv_seqlen=kv_lengths,
            scale=args.scale,
            mask_type=mask_type,
            sliding_window_length=None if window is None else window[0] + 1,
            return_residual=True,
        )  # out [B, T, N, H], lse [B, N, T] float32
    except TypeError:  # the private signature changed
        return _jax_nn(args, args.value, return_residual=True)
    return out, jnp.swapaxes(lse, 1, 2)


def _lse_with_gradient(args: AttentionArgs, lse: Array) -> Array:
    """lse `[B, T, N]` (cuDNN's, gradient stopped) with its gradient, which cuDNN's backward
    drops (jax.nn's vjp ignores the lse's cotangent). d lse_i / d s_ij = P_ij, so with s = scale
    q k^T: dq_i = scale d_lse_i sum_j P_ij k_j, which is attention with K as the values, and
    dk_j = scale sum_i P_ij d_lse_i q_i, which is that attention's value gradient at the
    cotangent scale d_lse q. Both run only where the lse's cotangent is not a symbolic zero;
    with a bias its gradient (P d_lse) is not served: NotImplementedError when traced."""

    @jax.custom_vjp
    def lse_of(lse, query, key, mask, q_lengths, kv_lengths):
        del query, key, mask, q_lengths, kv_lengths
        return lse

    def forward(*primals):
        lse, query, key, mask, q_lengths, kv_lengths = jax.tree.map(lambda p: p.value, primals)
        return lse, (lse, query, key, mask, q_lengths, kv_lengths)

    def backward(residuals, d_lse):  # d_lse [B, T, N]
        nothing = (None,) * 6
        if isinstance(d_lse, SymbolicZero):
            return nothing
        if args.bias is not None:
            raise NotImplementedError(
                "cudnn: the gradient of the lse with a bias is not served (use "
                "implementation='mosaic', 'triton' or 'xla')"
            )
        lse, query, key, mask, q_lengths, kv_lengths = residuals
        at = dataclasses.replace(
            args,
            query=query,
            key=key,
            mask=mask,
            query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths,
        )
        seen = jnp.isfinite(lse)[..., None]  # rows that see a key [B, T, N, 1]
        d_lse = jnp.where(seen, d_lse[..., None], 0).astype(jnp.float32)
        keys_mean, value_vjp = jax.vjp(
            lambda values: _jax_nn(at, values, return_residual=False), key
        )  # sum_j P_ij k_j [B, T, N, H]
        dq = args.scale * d_lse * jnp.where(seen, keys_mean.astype(jnp.float32), 0)
        (dk,) = value_vjp((args.scale * d_lse * query).astype(query.dtype))
        return (None, dq.astype(query.dtype), dk) + nothing[3:]

    lse_of.defvjp(forward, backward, symbolic_zeros=True)
    return lse_of(
        lse, args.query, args.key, args.mask, args.query_seq_lengths, args.key_value_seq_lengths
    )


register_implementation("cudnn", _cudnn)
