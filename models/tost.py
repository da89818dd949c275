"""ToST models (Token Statistics Transformer, Wu et al., ICLR 2025) and softmax baselines.

- `VisionTransformer`: patches -> pre-LN blocks with LayerScale -> mean pool -> classes.
  `attention="tssa"` is ToST's vision model (non-causal TSSA, linear in the number of tokens);
  `attention="softmax"` is the same network with multi-head softmax attention (a ViT).
- `CausalLM`: byte tokens + learned positions -> causal blocks -> tied output embedding.
  `attention="tssa"` is ToST's language model (causal TSSA with its per-position `denom_bias`);
  `attention="softmax"` the same network with causal flash attention. Bias-free, as the
  official one trains (`bias=False` in `tost_lang/train.py`: no bias in any Linear or LayerNorm).

Same width, depth, heads and block for both kinds (`jattn.nn.ToSTBlock`: pre-LN, LayerScale);
TSSA has one input projection where softmax attention has three (q, k, v), so the ToST models
have fewer parameters (`count_params`).

    python -m models.train_tost --help
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

import jattn

ATTENTION_KINDS = ("tssa", "softmax")


def make_block(kind: str, dim: int, heads: int, *, causal: bool, max_length: int, **options):
    """A ToST block (`jattn.nn.ToSTBlock`) or the same block with softmax attention."""
    if kind == "tssa":
        return jattn.nn.ToSTBlock(
            dim, heads, causal=causal, max_length=max_length if causal else None, **options
        )
    if kind == "softmax":
        return SoftmaxBlock(dim, heads, causal=causal, **options)
    raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")


class SoftmaxBlock(nnx.Module):
    """`jattn.nn.ToSTBlock` with multi-head softmax attention in place of TSSA (the baseline):
    x + gamma1 * attention(LN(x)), then x + gamma2 * MLP(LN(x)); the same LayerNorms and biases."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        causal: bool,
        layer_scale_init: float,
        norm_epsilon: float,
        use_bias: bool = True,
        mlp_ratio: int = 4,
        rngs: nnx.Rngs,
    ):
        norm = dict(epsilon=norm_epsilon, use_bias=use_bias, use_fast_variance=False, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, **norm)
        self.attention = jattn.nn.MultiHeadAttention(
            heads, dim, is_causal=causal, use_bias=use_bias, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, **norm)
        self.fc1 = nnx.Linear(dim, mlp_ratio * dim, use_bias=use_bias, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_ratio * dim, dim, use_bias=use_bias, rngs=rngs)
        self.gamma1 = nnx.Param(jnp.full((dim,), layer_scale_init))
        self.gamma2 = nnx.Param(jnp.full((dim,), layer_scale_init))

    def __call__(self, x: Array) -> Array:
        x = x + self.gamma1[...][None, None] * self.attention(self.norm1(x))
        hidden = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)
        return x + self.gamma2[...][None, None] * self.fc2(hidden)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    attention: str = "tssa"
    num_tokens: int = 16  # 8x8 digits in 2x2 patches
    patch_dim: int = 4
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    heads: int = 4
    layer_scale: float = 1.0  # ToST's eta for shallow models


class VisionTransformer(nnx.Module):
    """Patch tokens `[B, tokens, patch_dim]` -> class logits `[B, classes]`."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Linear(config.patch_dim, config.dim, rngs=rngs)
        self.positions = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (config.num_tokens, config.dim))
        )
        self.blocks = nnx.List(
            [
                make_block(
                    config.attention,
                    config.dim,
                    config.heads,
                    causal=False,
                    max_length=config.num_tokens,
                    layer_scale_init=config.layer_scale,
                    norm_epsilon=1e-6,
                    rngs=rngs,
                )
                for _ in range(config.depth)
            ]
        )
        self.norm = nnx.LayerNorm(config.dim, epsilon=1e-6, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(config.dim, config.num_classes, rngs=rngs)

    def __call__(self, patches: Array) -> Array:
        x = self.embed(patches) + self.positions[...][None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))


@dataclasses.dataclass(frozen=True)
class LMConfig:
    attention: str = "tssa"
    vocab_size: int = 256
    max_length: int = 256
    dim: int = 128
    depth: int = 2
    heads: int = 4
    layer_scale: float = 1.0
    bias: bool = False  # the official ToST LM's: no bias in Linear and LayerNorm layers


class CausalLM(nnx.Module):
    """Token ids `[B, T]` -> next-token logits `[B, T, vocab]` (T <= max_length)."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.dim, rngs=rngs)
        self.positions = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (config.max_length, config.dim))
        )
        self.blocks = nnx.List(
            [
                make_block(
                    config.attention,
                    config.dim,
                    config.heads,
                    causal=True,
                    max_length=config.max_length,
                    layer_scale_init=config.layer_scale,
                    norm_epsilon=1e-5,
                    use_bias=config.bias,
                    rngs=rngs,
                )
                for _ in range(config.depth)
            ]
        )
        self.norm = nnx.LayerNorm(
            config.dim, epsilon=1e-5, use_bias=config.bias, use_fast_variance=False, rngs=rngs
        )

    def __call__(self, tokens: Array) -> Array:
        length = tokens.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"{length} tokens > max_length {self.config.max_length}")
        x = self.embed(tokens) + self.positions[...][None, :length]
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.norm(x))


def classification_loss(model: nnx.Module, batch: tuple[Array, Array]) -> Array:
    images, labels = batch
    logits = model(images).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
