"""A decoder-only transformer (GPT) on `jattn.nn.MultiHeadAttention`: the model is
`jattn.examples.gpt` (which `jattn demo` trains too), re-exported here with its sampler.

Pre-LayerNorm blocks, rotary positions, GQA, a GELU MLP, tied input/output embeddings. Training
runs flash attention through `jattn.dot_product_attention` (the Pallas kernels on a GPU, the
chunked XLA path elsewhere); generation prefills the KV cache with it and decodes with
`jattn.decode_attention` (or an offloaded decode, through `decode_fn`).

    python -m models.train_gpt --help
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from jattn.examples.gpt import GPT as GPT
from jattn.examples.gpt import MLP as MLP
from jattn.examples.gpt import Block as Block
from jattn.examples.gpt import GPTConfig as GPTConfig
from jattn.examples.gpt import next_token_loss as next_token_loss


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
