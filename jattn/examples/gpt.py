"""A small decoder-only transformer (GPT) on `jattn.nn.MultiHeadAttention`: `jattn demo gpt`'s
model, and the one `models/train_gpt.py` trains.

Pre-LayerNorm blocks, rotary positions, GQA, a GELU MLP, tied input/output embeddings. Training
runs flash attention through `jattn.dot_product_attention` (the Pallas kernels on a GPU, the
chunked XLA path elsewhere); generation prefills the KV cache with it and decodes with
`jattn.decode_attention` (or an offloaded decode, through `decode_fn`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

import jattn
from jattn.nn.attention import DecodeFn


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    max_length: int = 256  # longest sequence (prompt + generated) the KV cache is sized for
    num_layers: int = 4
    dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_ratio: int = 4
    rope_base: float = 10_000.0
    implementation: str | Sequence[str] | None = None  # dot_product_attention's


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: GPTConfig, *, decode_fn: DecodeFn | None, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(config.dim, rngs=rngs)
        self.attention = jattn.nn.MultiHeadAttention(
            config.num_heads,
            config.dim,
            num_kv_heads=config.num_kv_heads,
            is_causal=True,
            rope_base=config.rope_base,
            implementation=config.implementation,
            decode_fn=decode_fn,
            rngs=rngs,
        )
        self.norm2 = nnx.LayerNorm(config.dim, rngs=rngs)
        self.mlp = MLP(config.dim, config.mlp_ratio * config.dim, rngs=rngs)

    def __call__(self, x: Array, **attention_options: Any) -> Array:
        x = x + self.attention(self.norm1(x), **attention_options)
        return x + self.mlp(self.norm2(x))


class GPT(nnx.Module):
    """Token ids `[B, T]` -> next-token logits `[B, T, vocab]`."""

    def __init__(self, config: GPTConfig, *, decode_fn: DecodeFn | None = None, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.dim, rngs=rngs)
        self.blocks = nnx.List(
            [Block(config, decode_fn=decode_fn, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = nnx.LayerNorm(config.dim, rngs=rngs)

    def __call__(
        self, tokens: Array, *, decode: bool = False, query_seq_lengths: Array | None = None
    ) -> Array:
        x = self.embed(tokens)
        options = dict(decode=True, query_seq_lengths=query_seq_lengths) if decode else {}
        for block in self.blocks:
            x = block(x, **options)
        return self.embed.attend(self.norm(x))  # tied output embedding

    def init_cache(
        self, batch_size: int, max_length: int | None = None, sharding: Any = None
    ) -> None:
        for block in self.blocks:
            block.attention.init_cache(
                batch_size, max_length or self.config.max_length, sharding=sharding
            )

    def set_decode_fn(self, decode_fn: DecodeFn | None) -> None:
        """Route every layer's decode steps through `decode_fn` (e.g. an offloaded decode)."""
        for block in self.blocks:
            block.attention.decode_fn = decode_fn


def next_token_loss(model: nnx.Module, tokens: Array) -> Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (`tokens [B, T + 1]`)."""
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    targets = tokens[:, 1:]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))


@nnx.jit
def _prefill(model: GPT, prompt: Array, prompt_lengths: Array) -> Array:
    logits = model(prompt, decode=True, query_seq_lengths=prompt_lengths)
    return jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]


@nnx.jit
def _decode_step(model: GPT, token: Array) -> Array:
    return model(token[:, None], decode=True)[:, 0]


def generate(
    model: GPT,
    prompt: Array,  # [B, P] int, right-padded
    num_tokens: int,
    *,
    prompt_lengths: Array | None = None,  # [B]; default: all P
    temperature: float = 0.8,
    seed: int = 0,
    cache_length: int | None = None,
    cache_sharding: Any = None,
) -> Array:  # [B, num_tokens]
    """Sample `num_tokens` after each prompt: one prefill, then one decode step per token.

    Temperature 0 is greedy. The model's KV cache is (re)allocated for `cache_length` (default
    prompt + new tokens) positions, placed with `cache_sharding` (see `GPT.set_decode_fn`); a
    cache shorter than the longest prompt + `num_tokens` raises ValueError (its steps run under
    `nnx.jit`, where a full cache could only flag the overflow, not stop it).
    """
    batch, prompt_length = prompt.shape
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), prompt_length, jnp.int32)
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (batch,) or (lengths < 1).any() or (lengths > prompt_length).any():
        raise ValueError(
            f"prompt_lengths must be [B] = ({batch},) in [1, P = {prompt_length}], got "
            f"{lengths.tolist()}"
        )
    needed = int(lengths.max()) + num_tokens
    cache_length = prompt_length + num_tokens if cache_length is None else cache_length
    if cache_length < needed:
        raise ValueError(
            f"cache_length {cache_length} is too small: the longest prompt "
            f"({int(lengths.max())} tokens) + {num_tokens} new tokens need {needed} positions"
        )
    model.init_cache(batch, cache_length, sharding=cache_sharding)
    logits = _prefill(model, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32))
    key = jax.random.key(seed)
    tokens = []
    for _ in range(num_tokens):
        key, sample_key = jax.random.split(key)
        if temperature == 0:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(sample_key, logits / temperature)
        tokens.append(token)
        logits = _decode_step(model, token.astype(jnp.int32))
    return jnp.stack(tokens, axis=1)
