"""`implementation="cudnn"`: cuDNN flash attention through `jax.nn.dot_product_attention`.

Serves what cuDNN serves and declines (NotImplementedError, with the reason) the rest:
float32, head dims that are not a multiple of 8 (or > 256; > 128 before Hopper), q_offset,
segment_ids, soft cap, a right window without causal, and bias with odd T or S (cuDNN's backward
needs them even). Rows that see no key are zeroed here so the result keeps jattn's contract
(cuDNN itself would return whatever its kernel leaves there).
"""

import jax
import jax.numpy as jnp
from jax import Array

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
    window = args.local_window_size
    if window is not None and args.is_causal:
        window = (window[0], 0)  # causal already hides every key right of the query
    # Slots past a length may hold NaN: cuDNN's P.V would let it in as 0 * NaN.
    args = zero_keys_past_lengths(args)
    out, lse = jax.nn.dot_product_attention(
        args.query,
        args.key,
        args.value,
        args.bias,
        args.mask,
        scale=args.scale,
        is_causal=args.is_causal,
        query_seq_lengths=args.query_seq_lengths,
        key_value_seq_lengths=args.key_value_seq_lengths,
        local_window_size=window,
        implementation="cudnn",
        return_residual=True,
    )
    ok = jnp.moveaxis(_rows_with_keys(args), 1, 2)  # [B, T, N or 1]
    out = jnp.where(ok[..., None], out, 0).astype(args.query.dtype)
    lse = jnp.where(ok, lse.astype(jnp.float32), -jnp.inf)
    return out, lse


register_implementation("cudnn", _cudnn)
