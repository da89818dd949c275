"""`jattn.nn.TokenStatisticsAttention` and `ToSTBlock`: the ToST layer and block (ICLR 2025).

The attention matches the official modules (`tost_vision/tost.py` AttentionTSSA,
`tost_lang/model_TSSA.py` CausalSelfAttention_TSSA): ONE projection to `[N, H]` (ToST has no
separate q/k/v), TSSA with a per-head temperature (and, causal, a per-position `denom_bias`),
then the output projection. The operator is `jattn.token_statistics_attention`.

Weight decay: `weight_decay_mask(params)` returns the mask `optax.adamw(..., mask=...)` wants,
by the official language model's rule (`tost_lang/model_TSSA.py`, `GPT.configure_optimizers`):
a parameter decays when it has 2 or more dimensions and its name contains neither `temp` nor
`denom`. So the temperature and the causal `denom_bias` never decay, nor do biases, LayerNorm
scales or LayerScale; projection kernels and embeddings do. The temperature is a `Temperature`
variable (an `nnx.Param` subclass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from jattn.tssa import token_statistics_attention


class Temperature(nnx.Param):
    """The per-head softmax temperature of TSSA: a parameter kept out of weight decay."""


NO_DECAY_KEYWORDS = ("temp", "denom")  # the official LM's `keywords` in configure_optimizers


def weight_decay_mask(params) -> object:
    """True where AdamW should decay, by the official ToST language model's rule.

    `GPT.configure_optimizers` in `tost_lang/model_TSSA.py` decays a parameter iff
    `p.dim() >= 2 and not any(kw in name for kw in ['temp', 'denom'])`, `name` being its full
    dotted name: this is that rule, with a name matching when any key on the leaf's path contains
    `temp` or `denom` (so `temperature` and `denom_bias` never decay). Two additions keep the rule
    the same on jattn's shapes: a leaf named `bias` never decays (the official biases are 1-D;
    the head-shaped projections here have `[N, H]` biases), nor does a `Temperature` variable
    under any name. LayerNorm scales and LayerScale (1-D) never decay; kernels and embeddings do.

    `params`: an `nnx.State` (e.g. `nnx.state(model, nnx.Param)`) or the pytree an optimizer
    sees. Use it as `optax.adamw(lr, weight_decay=0.1, mask=weight_decay_mask)`.

    Example:
      >>> layer = TokenStatisticsAttention(4, 32, causal=True, max_length=8, rngs=nnx.Rngs(0))
      >>> mask = weight_decay_mask(nnx.state(layer, nnx.Param))
      >>> [bool(mask[k].get_value()) for k in ("temperature", "denom_bias")]
      [False, False]
      >>> bool(mask["qkv"]["kernel"].get_value())
      True
    """

    def decays(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        excluded = "bias" in names or any(kw in name for kw in NO_DECAY_KEYWORDS for name in names)
        if isinstance(leaf, nnx.Variable):
            decay = not isinstance(leaf, Temperature) and leaf.get_value().ndim >= 2
            return leaf.replace(decay and not excluded)
        return jnp.ndim(leaf) >= 2 and not excluded

    return jax.tree_util.tree_map_with_path(
        decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


class TokenStatisticsAttention(nnx.Module):
    """Token Statistics Self-Attention: projection, TSSA over heads, output projection.

    Args:
      num_heads: N.
      in_features: the model width C.
      head_dim: H (default C // N).
      out_features: width of the output (default C).
      causal: the language operator (running statistics, `denom_bias`) instead of the vision one.
      max_length: causal only: L, the positions `denom_bias [N, L]` covers (ToST's block_size);
        longer inputs raise ValueError. None: no position bias.
      use_bias: biases in both projections. ToST's vision models have them (qkv_bias=True and
        the to_out bias); its language model has none (`bias=False` in `tost_lang/train.py`).
      output_bias: the output projection's bias, when it differs from `use_bias` (None: the
        same). The official vision AttentionTSSA always has a to_out bias: its default
        qkv_bias=False is `use_bias=False, output_bias=True`.
      attention_dropout: ToST's attn_drop, on the factor 1 / (1 + m) (applied to the output,
        which that factor multiplies: the same thing); output_dropout: after the projection.
      implementation: passed to `jattn.token_statistics_attention` (None: auto).

    Example:
      >>> layer = TokenStatisticsAttention(4, 32, causal=True, max_length=16, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 10, 32))).shape
      (2, 10, 32)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        head_dim: int | None = None,
        out_features: int | None = None,
        causal: bool = False,
        max_length: int | None = None,
        use_bias: bool = True,
        output_bias: bool | None = None,
        attention_dropout: float = 0.0,
        output_dropout: float = 0.0,
        implementation: str | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if max_length is not None and not causal:
            raise ValueError("max_length sizes the causal denom_bias; pass causal=True")
        head_dim = head_dim or in_features // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.causal, self.implementation = causal, implementation
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.LinearGeneral(
            in_features, (num_heads, head_dim), use_bias=use_bias, **linear
        )
        self.out = nnx.LinearGeneral(
            (num_heads, head_dim),
            out_features or in_features,
            axis=(-2, -1),
            use_bias=use_bias if output_bias is None else output_bias,
            **linear,
        )
        self.temperature = Temperature(jnp.ones((num_heads,), param_dtype))
        self.denom_bias = (
            nnx.Param(jnp.zeros((num_heads, max_length), param_dtype))
            if max_length is not None
            else None
        )
        # Official attn_drop samples one mask entry per (batch, head, coordinate) in the vision
        # operator (its factor is constant over tokens) and per token too in the causal one.
        self.attention_dropout = nnx.Dropout(
            attention_dropout, broadcast_dims=() if causal else (1,), rngs=rngs
        )
        self.output_dropout = nnx.Dropout(output_dropout, rngs=rngs)

    def __call__(self, x: Array) -> Array:  # [B, T, C] -> [B, T, out_features]
        w = self.qkv(x)  # [B, T, N, H]
        denom_bias = self.denom_bias[...] if self.denom_bias is not None else None
        y = token_statistics_attention(
            w,
            self.temperature[...],
            causal=self.causal,
            denom_bias=denom_bias,
            implementation=self.implementation,
        )
        return self.output_dropout(self.out(self.attention_dropout(y)))


class ToSTBlock(nnx.Module):
    """A ToST block: pre-LayerNorm residual TSSA and MLP, each scaled by LayerScale.

    x = x + gamma1 * attention(norm1(x)); x = x + gamma2 * mlp(norm2(x)) (ToST's `eta` is the
    LayerScale init: 1.0 for depth-12 vision models, 1e-5 for depth 24 and the language models;
    LayerNorm eps 1e-6 vision, 1e-5 language). MLP: Linear, GELU, Linear (ratio 4), dropout.
    `use_bias`: biases in every Linear and LayerNorm of the block (the vision models: True; the
    official language model: False, nanoGPT's `bias=False`; its LayerNorms keep their scale).

    The LayerNorms compute the variance as the mean of squared deviations from the mean (two
    passes, as PyTorch's layer_norm), not E[x^2] - E[x]^2: on float32 inputs with a large mean
    (residual streams drift) the fast form cancels and loses most of the variance's digits.

    Example:
      >>> block = ToSTBlock(32, 4, causal=True, max_length=16, rngs=nnx.Rngs(0))
      >>> block(jnp.ones((2, 10, 32))).shape
      (2, 10, 32)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        causal: bool = False,
        max_length: int | None = None,
        layer_scale_init: float = 1.0,
        norm_epsilon: float = 1e-6,
        use_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        implementation: str | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(epsilon=norm_epsilon, use_bias=use_bias, use_fast_variance=False, **common)
        self.norm1 = nnx.LayerNorm(dim, **norm)
        self.attention = TokenStatisticsAttention(
            num_heads,
            dim,
            causal=causal,
            max_length=max_length,
            use_bias=use_bias,
            attention_dropout=attention_dropout,
            output_dropout=dropout,
            implementation=implementation,
            **common,
        )
        self.norm2 = nnx.LayerNorm(dim, **norm)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nnx.Linear(dim, hidden, use_bias=use_bias, **common)
        self.fc2 = nnx.Linear(hidden, dim, use_bias=use_bias, **common)
        self.mlp_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.gamma1 = nnx.Param(jnp.full((dim,), layer_scale_init, param_dtype))
        self.gamma2 = nnx.Param(jnp.full((dim,), layer_scale_init, param_dtype))

    def __call__(self, x: Array) -> Array:  # [B, T, C]
        x = x + self.gamma1[...][None, None] * self.attention(self.norm1(x))
        hidden = self.mlp_dropout(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
        return x + self.gamma2[...][None, None] * self.mlp_dropout(self.fc2(hidden))
