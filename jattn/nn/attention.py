"""`jattn.nn.MultiHeadAttention`: a Flax NNX attention layer over `jattn.dot_product_attention`.

Also `flax_attention_fn`, which makes `jattn.dot_product_attention` the `attention_fn` of
`flax.nnx.MultiHeadAttention` (so an existing Flax model switches by one argument).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from jattn.attention import concrete_value, dot_product_attention
from jattn.decode import decode_attention
from jattn.flex import BlockMask, MaskMod, ScoreMod, flex_attention
from jattn.nn.rotary import apply_rotary

# (query [B, N, H], k_cache [B, S, K, H], v_cache, lengths [B], *, scale, logits_soft_cap)
# -> [B, N, H]: `jattn.decode_attention`, or an offloaded / sharded version of it.
DecodeFn = Callable[..., Array]


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with grouped kv heads (GQA/MQA), rotary embeddings and a KV cache.

    Projections: query to `[N, H]`, key and value to `[K, H]` (K = num_kv_heads divides N), output
    from `[N, H]` back to `out_features`. The attention itself is `jattn.dot_product_attention`
    with every masking option it has (causal, lengths, segments, window, soft cap, bias, mask).
    With `score_mod` / `mask_mod` it is `jattn.flex_attention` instead (ALiBi, relative bias,
    document masks ... written as two scalar functions; `is_causal` composes with them; pass a
    `block_mask` to the call to skip empty tiles; the other masking options are then refused).

    `rope_base` turns on rotary embeddings of queries and keys (positions `q_offset + t` for
    queries and `s` for keys unless `positions` is given).

    Decoding: `init_cache(batch_size, max_length)` allocates the KV cache (`nnx.Cache` variables
    `cached_key`, `cached_value` `[B, max_length, K, H]` and `cache_lengths` `[B]`); then each
    `layer(x, decode=True)` appends x's keys and values at each sequence's current length and
    attends over the cache. A call with T > 1 tokens (the prompt, or a chunk of it) is a prefill
    through `dot_product_attention` (flash attention, causal with `q_offset` = current length);
    a call with one token is a decode step through `decode_fn` (`jattn.decode_attention` by
    default; pass a sharded or offloaded one to move attention to other devices). Prompts of
    different lengths: right-pad them and pass `query_seq_lengths` (in [0, T]); each cache then
    advances by its own length.

    A full cache never drops a token silently. With concrete lengths (eager calls) a step that
    does not fit raises `ValueError`. Under a trace (`nnx.jit`, scan) tokens past the capacity
    are not written (no earlier slot is overwritten), `cache_lengths` stops at the capacity and
    the sticky flag `cache_overflow` (`nnx.Cache`, bool `[B]`) turns True for that sequence:
    read it, or call `check_cache()` outside the trace, which raises. `query_seq_lengths` past
    T raise when concrete and are clamped to T when traced (a cache never counts unwritten
    tokens).

    Example:
      >>> layer = MultiHeadAttention(8, 64, num_kv_heads=2, is_causal=True, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 10, 64))).shape
      (2, 10, 64)
      >>> layer.init_cache(2, 16)
      >>> prompt = layer(jnp.ones((2, 10, 64)), decode=True)  # prefill
      >>> layer(jnp.ones((2, 1, 64)), decode=True).shape  # one decode step
      (2, 1, 64)
      >>> layer.cache_lengths[...].tolist()
      [11, 11]
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        out_features: int | None = None,
        is_causal: bool = False,
        local_window_size: int | tuple[int, int] | None = None,
        logits_soft_cap: float | None = None,
        rope_base: float | None = None,
        use_bias: bool = False,
        implementation: str | Sequence[str] | None = None,
        config: Any = None,
        decode_fn: DecodeFn | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Any = None,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if in_features % num_heads:
                raise ValueError(
                    f"in_features ({in_features}) is not divisible by num_heads "
                    f"({num_heads}); pass head_dim"
                )
            head_dim = in_features // num_heads
        if rope_base is not None and head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.is_causal = is_causal
        self.local_window_size = local_window_size
        self.logits_soft_cap = logits_soft_cap
        self.rope_base = rope_base
        self.implementation = implementation
        self.config = config
        self.decode_fn = decode_fn
        # jattn.flex_attention's mods (see `_flex`); is_causal composes with them.
        self.score_mod, self.mask_mod = score_mod, mask_mod
        self.dtype, self.param_dtype = dtype, param_dtype
        projection = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if kernel_init is not None:
            projection["kernel_init"] = kernel_init
        self.query = nnx.LinearGeneral(in_features, (num_heads, head_dim), **projection)
        self.key = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **projection)
        self.value = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **projection)
        self.out = nnx.LinearGeneral(
            (num_heads, head_dim), out_features or in_features, axis=(-2, -1), **projection
        )
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_lengths: nnx.Cache | None = nnx.data(None)
        self.cache_overflow: nnx.Cache | None = nnx.data(None)

    def init_cache(
        self, batch_size: int, max_length: int, dtype: Any = None, sharding: Any = None
    ) -> None:
        """Allocate an empty KV cache for `batch_size` sequences of up to `max_length` tokens.

        `sharding` (e.g. a `NamedSharding` over attention devices, `jattn.offload.cache_spec`)
        places the `[B, max_length, K, H]` cache arrays; pair it with a sharded `decode_fn`.
        """
        if not self.is_causal:
            raise ValueError("a KV cache needs a causal layer (is_causal=True)")
        dtype = dtype or self.dtype or self.param_dtype
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        empty = jnp.zeros(shape, dtype)
        if sharding is not None:
            empty = jax.device_put(empty, sharding)
        self.cached_key = nnx.Cache(empty)
        self.cached_value = nnx.Cache(empty)
        self.cache_lengths = nnx.Cache(jnp.zeros((batch_size,), jnp.int32))
        self.cache_overflow = nnx.Cache(jnp.zeros((batch_size,), jnp.bool_))

    def check_cache(self) -> None:
        """Raise ValueError if a decode step under a trace found its cache full (tokens past
        the capacity were dropped; see the class docstring). Reads `[B]` flags to the host."""
        if self.cache_overflow is None:
            return
        flags = concrete_value(self.cache_overflow[...])
        if flags is None:
            raise ValueError("check_cache() reads the overflow flags: call it outside jit")
        if flags.any():
            raise ValueError(
                f"KV cache overflow: sequences {np.flatnonzero(flags).tolist()} reached the "
                f"capacity {self.cached_key[...].shape[1]}; tokens past it were dropped"
            )

    def __call__(
        self,
        inputs_q: Array,  # [B, T, D]
        inputs_kv: Array | None = None,  # [B, S, D]; None = self-attention
        *,
        bias: Array | None = None,
        mask: Array | None = None,
        query_seq_lengths: Array | None = None,
        key_value_seq_lengths: Array | None = None,
        segment_ids: tuple[Array, Array] | None = None,
        q_offset: int | Array | None = None,
        positions: Array | None = None,  # [B, T] or [T]: rotary positions of self-attention
        decode: bool = False,
        block_mask: BlockMask | None = None,  # with score_mod / mask_mod: jattn.create_block_mask
    ) -> Array:  # [B, T, out_features]
        flex = self.score_mod is not None or self.mask_mod is not None or block_mask is not None
        if flex:
            unsupported = dict(
                decode=decode or None,
                bias=bias,
                mask=mask,
                query_seq_lengths=query_seq_lengths,
                key_value_seq_lengths=key_value_seq_lengths,
                segment_ids=segment_ids,
                q_offset=q_offset,
                local_window_size=self.local_window_size,
                logits_soft_cap=self.logits_soft_cap,
            )
            named = [name for name, value in unsupported.items() if value is not None]
            if named:
                raise ValueError(
                    f"a layer with score_mod/mask_mod/block_mask takes no {', '.join(named)}: "
                    "write them into the mods (jattn.flex_attention)"
                )
        if decode:
            if inputs_kv is not None or bias is not None or mask is not None:
                raise ValueError("decode=True is causal self-attention: no inputs_kv, bias, mask")
            if segment_ids is not None or key_value_seq_lengths is not None or q_offset is not None:
                raise ValueError(
                    "decode=True takes positions from the cache: no segment_ids, "
                    "key_value_seq_lengths or q_offset"
                )
            return self._decode(inputs_q, query_seq_lengths)
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        query = self.query(inputs_q)  # [B, T, N, H]
        key = self.key(inputs_kv)  # [B, S, K, H]
        value = self.value(inputs_kv)  # [B, S, K, H]
        if self.rope_base is not None:
            if positions is None:
                offset = 0 if q_offset is None else jnp.reshape(jnp.asarray(q_offset), (-1, 1))
                q_positions = offset + jnp.arange(query.shape[1])[None]
                k_positions = jnp.arange(key.shape[1])
            else:
                q_positions = k_positions = positions
            query = apply_rotary(query, q_positions, self.rope_base)
            key = apply_rotary(key, k_positions, self.rope_base)
        if flex:
            return self.out(self._flex(query, key, value, block_mask))
        encoded = dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            is_causal=self.is_causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            local_window_size=self.local_window_size,
            q_offset=q_offset,
            segment_ids=segment_ids,
            logits_soft_cap=self.logits_soft_cap,
            implementation=self.implementation,
            config=self.config,
        )
        return self.out(encoded)

    def _flex(self, query: Array, key: Array, value: Array, block_mask) -> Array:
        """`jattn.flex_attention` with the layer's mods; is_causal adds `kv_idx <= q_idx` to
        the mask_mod (a block_mask must then be built from the combined mask)."""
        mask_mod = self.mask_mod
        if mask_mod is None and block_mask is not None:
            mask_mod = block_mask.mask_mod
        if self.is_causal:
            user = mask_mod

            def mask_mod(b, h, q_idx, kv_idx):
                causal = kv_idx <= q_idx
                return causal if user is None else causal & user(b, h, q_idx, kv_idx)

        return flex_attention(
            query,
            key,
            value,
            score_mod=self.score_mod,
            mask_mod=mask_mod,
            block_mask=block_mask,
            implementation=self.implementation,
            config=self.config,
        )

    def _decode(self, inputs: Array, new_tokens: Array | None) -> Array:
        if self.cached_key is None:
            raise ValueError("decode=True needs a KV cache: call init_cache(batch, max_length)")
        cache_k, cache_v = self.cached_key[...], self.cached_value[...]
        lengths = self.cache_lengths[...]  # [B]
        batch, capacity = cache_k.shape[:2]
        steps = inputs.shape[1]
        if inputs.ndim != 3 or inputs.shape[0] != batch:
            raise ValueError(
                f"decode inputs must be [B = {batch}, T, D], got {inputs.shape} "
                f"(cache {cache_k.shape})"
            )
        if new_tokens is None:
            advance = jnp.full((batch,), steps, jnp.int32)
        else:
            new_tokens = jnp.asarray(new_tokens)
            if new_tokens.shape != (batch,) or new_tokens.dtype.kind not in "iu":
                raise ValueError(
                    f"query_seq_lengths must be integers [B] = ({batch},), got "
                    f"{new_tokens.dtype} {new_tokens.shape}"
                )
            known_new = concrete_value(new_tokens)
            if known_new is not None and ((known_new < 0).any() or (known_new > steps).any()):
                raise ValueError(
                    f"query_seq_lengths must lie in [0, T = {steps}] (the tokens given), got "
                    f"{known_new.tolist()}"
                )
            advance = new_tokens = jnp.clip(new_tokens, 0, steps).astype(jnp.int32)
        known, known_advance = concrete_value(lengths), concrete_value(advance)
        if known is not None and known_advance is not None:
            if (known + known_advance > capacity).any():
                raise ValueError(
                    f"KV cache overflow: lengths {known.tolist()} + new tokens "
                    f"{known_advance.tolist()} > capacity {capacity} (cache {cache_k.shape})"
                )
        query = self.query(inputs)  # [B, T, N, H]
        key = self.key(inputs)  # [B, T, K, H]
        value = self.value(inputs)  # [B, T, K, H]
        if self.rope_base is not None:
            positions = lengths[:, None] + jnp.arange(steps)[None]  # [B, T]
            query = apply_rotary(query, positions, self.rope_base)
            key = apply_rotary(key, positions, self.rope_base)
        # Slots lengths + t; past the capacity a token is dropped (mode="drop"), never written
        # over an earlier slot (dynamic_update_slice would clamp the start).
        slots = lengths[:, None] + jnp.arange(steps, dtype=jnp.int32)[None]  # [B, T]
        rows = jnp.arange(batch)[:, None]

        def write(cache, new):
            return cache.at[rows, slots].set(new.astype(cache.dtype), mode="drop")

        cache_k, cache_v = write(cache_k, key), write(cache_v, value)
        overflow = lengths + advance > capacity
        new_lengths = jnp.minimum(lengths + advance, capacity)
        self.cached_key[...], self.cached_value[...] = cache_k, cache_v
        self.cache_lengths[...] = new_lengths
        if self.cache_overflow is not None:
            self.cache_overflow[...] = self.cache_overflow[...] | overflow
        query = query.astype(cache_k.dtype)
        if steps == 1 and new_tokens is None and self.local_window_size is None:
            decode = self.decode_fn or decode_attention
            cap = {} if self.logits_soft_cap is None else {"logits_soft_cap": self.logits_soft_cap}
            encoded = decode(query[:, 0], cache_k, cache_v, new_lengths, **cap)[:, None]
        else:
            encoded = dot_product_attention(
                query,
                cache_k,
                cache_v,
                is_causal=True,
                q_offset=lengths,
                query_seq_lengths=new_tokens,
                key_value_seq_lengths=new_lengths,
                local_window_size=self.local_window_size,
                logits_soft_cap=self.logits_soft_cap,
                implementation=self.implementation,
                config=self.config,
            )
        return self.out(encoded)


def _flatten_batch(x, batch_dims: tuple[int, ...]):
    """A bias or mask `[batch..., N, T, S]` (broadcastable) -> `[prod(batch), N', T', S']`."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.ndim <= 3:  # no batch axes: broadcasts over all of them
        return x
    lead = x.shape[:-3]
    if all(size == 1 for size in lead):
        return x.reshape(1, *x.shape[-3:])
    full = (1,) * (len(batch_dims) - len(lead)) + lead
    x = jnp.broadcast_to(x.reshape(*full, *x.shape[-3:]), (*batch_dims, *x.shape[-3:]))
    return x.reshape(-1, *x.shape[-3:])


def flax_attention_fn(
    implementation: str | Sequence[str] | None = None, **options: Any
) -> Callable[..., Array]:
    """`jattn.dot_product_attention` as the `attention_fn` of `flax.nnx.MultiHeadAttention`.

    Flax calls `attention_fn(query, key, value, mask=..., dropout_rng=..., dropout_rate=...,
    deterministic=..., dtype=..., precision=..., module=..., is_causal=...)`; this adapter takes
    that call and hands the arrays, the boolean mask (`[B, N, T, S]`, broadcast as in Flax) and
    `is_causal` to jattn. As Flax allows, query/key/value may carry several leading batch
    axes (`[batch..., L, N, H]`, mask and bias `[batch..., N, T, S]` broadcastable): they are
    flattened into one B for the call and restored after. `options` are further
    `dot_product_attention` keywords (`logits_soft_cap`, `local_window_size`, `config`, ...).
    Attention dropout and sowing the weights need the materialised probabilities, which flash
    attention never forms: they raise.

    Example:
      >>> layer = nnx.MultiHeadAttention(
      ...     4, 32, decode=False, attention_fn=flax_attention_fn(), rngs=nnx.Rngs(0)
      ... )
      >>> layer(jnp.ones((2, 5, 32))).shape
      (2, 5, 32)
    """

    def attention_fn(
        query,
        key,
        value,
        bias=None,
        mask=None,
        *,
        dropout_rate=0.0,
        deterministic=True,
        dtype=None,
        module=None,
        is_causal=False,
        **_ignored,  # broadcast_dropout, dropout_rng, precision, promote_dtype
    ):
        if dropout_rate > 0 and not deterministic:
            raise NotImplementedError(
                "jattn attention has no attention-probability dropout; use dropout_rate=0"
            )
        if module is not None:
            raise NotImplementedError("jattn never materialises attention weights to sow")
        if mask is not None:
            mask = jnp.asarray(mask).astype(jnp.bool_)  # Flax masks are 0/1 in any dtype
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        query, key, value = (jnp.asarray(x) for x in (query, key, value))
        batch_dims = query.shape[:-3]
        if query.ndim > 4 and key.ndim == value.ndim == query.ndim:
            if key.shape[:-3] != batch_dims or value.shape[:-3] != batch_dims:
                raise ValueError(
                    f"query, key and value must share their leading batch axes; got query "
                    f"{query.shape}, key {key.shape}, value {value.shape}"
                )
            query, key, value = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
            bias, mask = (_flatten_batch(x, batch_dims) for x in (bias, mask))
        out = dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            is_causal=is_causal,
            implementation=implementation,
            **options,
        )
        return out.reshape(*batch_dims, *out.shape[-3:]) if len(batch_dims) > 1 else out

    return attention_fn
