"""`jattn.nn.MultiHeadAttention`: a Flax NNX attention layer over `jattn.dot_product_attention`."""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import Array

from jattn.attention import dot_product_attention


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with grouped kv heads (GQA/MQA) and a choice of implementation.

    Projections: query to `[N, H]`, key and value to `[K, H]` (K = num_kv_heads divides N), output
    from `[N, H]` back to `out_features`. The attention itself is `jattn.dot_product_attention`
    with every masking option it has (causal, lengths, segments, window, soft cap, bias, mask).

    Example:
      >>> layer = MultiHeadAttention(8, 64, num_kv_heads=2, is_causal=True, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 10, 64))).shape
      (2, 10, 64)
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
        use_bias: bool = False,
        implementation: str | Sequence[str] | None = None,
        config: Any = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
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
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.is_causal = is_causal
        self.local_window_size = local_window_size
        self.logits_soft_cap = logits_soft_cap
        self.implementation = implementation
        self.config = config
        projection = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = nnx.LinearGeneral(in_features, (num_heads, head_dim), **projection)
        self.key = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **projection)
        self.value = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **projection)
        self.out = nnx.LinearGeneral(
            (num_heads, head_dim), out_features or in_features, axis=(-2, -1), **projection
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
    ) -> Array:  # [B, T, out_features]
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        query = self.query(inputs_q)  # [B, T, N, H]
        key = self.key(inputs_kv)  # [B, S, K, H]
        value = self.value(inputs_kv)  # [B, S, K, H]
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
