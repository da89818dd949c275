"""ToST layers and models against the official code (github.com/RobinWu218/ToST): which
parameters decay, which have biases, and the block's LayerNorm precision in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import reference
from models import tost, training


def _flat(tree) -> dict:
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
    }


def _value(leaf):
    return bool(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)


# What the official LM decays (model_TSSA.py, GPT.configure_optimizers: p.dim() >= 2 and no
# 'temp' / 'denom' in the name): wte (tied to lm_head), wpe, c_attn, attn.c_proj, mlp.c_fc,
# mlp.c_proj weights. Not: temp, denom_bias, LayerNorm weights (and biases), gamma1, gamma2.
def _official_lm_decayed(depth: int) -> set[str]:
    kernels = ("attention/qkv/kernel", "attention/out/kernel", "fc1/kernel", "fc2/kernel")
    blocks = {f"blocks/{i}/{name}" for i in range(depth) for name in kernels}
    return blocks | {"embed/embedding", "positions"}


def test_weight_decay_mask_is_the_official_lm_rule():
    lm = tost.CausalLM(tost.LMConfig(max_length=16, dim=32, depth=2), rngs=nnx.Rngs(0))
    state = nnx.state(lm, nnx.Param)
    want = _official_lm_decayed(2)
    for mask in (jattn.nn.weight_decay_mask(state), training.decay_mask(nnx.to_pure_dict(state))):
        flat = {name: _value(leaf) for name, leaf in _flat(mask).items()}
        assert {name for name, decays in flat.items() if decays} == want
        assert not flat["blocks/0/attention/denom_bias"]
        assert not flat["blocks/1/attention/temperature"]
    # The rule by name, as the official code words it, whatever the shape.
    names = {"temp": jnp.ones((2, 1)), "denom": jnp.ones((2, 8, 1)), "w": jnp.ones((3, 3))}
    assert jax.tree.map(_value, jattn.nn.weight_decay_mask(names)) == dict(
        temp=False, denom=False, w=True
    )
    assert training.decay_mask(names) == dict(temp=False, denom=False, w=True)


def test_adamw_with_the_mask_leaves_denom_bias_and_temperature_alone():
    import optax

    layer = jattn.nn.TokenStatisticsAttention(
        2, 8, causal=True, max_length=4, implementation="xla", rngs=nnx.Rngs(0)
    )
    layer.denom_bias[...] = jnp.ones((2, 4))
    params = nnx.state(layer, nnx.Param)
    optimizer = optax.adamw(0.1, weight_decay=0.5, mask=jattn.nn.weight_decay_mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    moved = {k: bool(jnp.any(v != 0)) for k, v in _flat(nnx.to_pure_dict(updates)).items()}
    assert moved == {
        "denom_bias": False,
        "temperature": False,
        "qkv/kernel": True,
        "qkv/bias": False,
        "out/kernel": True,
        "out/bias": False,
    }


@pytest.mark.parametrize("causal", [False, True])
def test_block_in_float32_on_inputs_with_a_large_mean_is_close_to_float64(rng, causal):
    # Residual streams drift far from zero mean: here mean 1000, std 1. LayerNorm's fast variance
    # E[x^2] - E[x]^2 cancels in float32 there (the update was ~15% off, gradients ~30%); the
    # two-pass variance leaves the float32 rounding of the inputs themselves.
    block = jattn.nn.ToSTBlock(
        32, 4, causal=causal, max_length=16 if causal else None, implementation="xla",
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    x = 1000 + rng.standard_normal((2, 12, 32))
    r = rng.standard_normal((2, 12, 32))

    @jax.jit
    def run(params, x, r):
        def loss(params):
            y = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum((y - x) * r), y

        grads, y = jax.grad(loss, has_aux=True)(params)
        return y, jax.tree.leaves(grads)

    def numpy64(tree):
        return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)

    x32 = np.float32(x)
    y, grads = numpy64(run(params, jnp.asarray(x32), jnp.asarray(r, jnp.float32)))
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        want_y, want_grads = numpy64(run(params64, jnp.asarray(x32, jnp.float64), jnp.asarray(r)))

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(y, want_y) < 1e-5
    assert rel(y - x32, want_y - x32) < 1e-3  # the block's update, x's rounding removed
    assert max(rel(a, b) for a, b in zip(grads, want_grads, strict=True)) < 2e-2


def _bias_paths(module) -> set[str]:
    names = _flat(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    return {name for name in names if name.split("/")[-1] == "bias"}


@pytest.mark.parametrize("attention", tost.ATTENTION_KINDS)
def test_language_model_is_bias_free_and_vision_model_keeps_its_biases(attention):
    # Official LM: bias=False in tost_lang/train.py, so c_attn, c_proj, the MLP and every
    # LayerNorm have no bias. Official vision: qkv_bias=True, to_out, MLP and LayerNorm biases.
    lm = tost.CausalLM(
        tost.LMConfig(attention=attention, max_length=8, dim=16, depth=2), rngs=nnx.Rngs(0)
    )
    assert _bias_paths(lm) == set()
    assert lm(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 256)
    vision = tost.VisionTransformer(
        tost.VisionConfig(attention=attention, dim=16, depth=2), rngs=nnx.Rngs(0)
    )
    biases = _bias_paths(vision)
    for i in range(2):
        assert {f"blocks/{i}/{n}/bias" for n in ("norm1", "norm2", "fc1", "fc2")} <= biases
    if attention == "tssa":
        assert {f"blocks/{i}/attention/{n}/bias" for i in (0, 1) for n in ("qkv", "out")} <= biases


def test_use_bias_switches_every_bias_of_the_layer_and_block(rng):
    def layer(**options):
        return jattn.nn.TokenStatisticsAttention(
            2, 8, implementation="xla", rngs=nnx.Rngs(0), **options
        )

    assert _bias_paths(layer()) == {"qkv/bias", "out/bias"}
    assert _bias_paths(layer(use_bias=False)) == set()
    assert _bias_paths(layer(use_bias=False, output_bias=True)) == {"out/bias"}  # vision default
    block = jattn.nn.ToSTBlock(
        8, 2, causal=True, max_length=6, use_bias=False, implementation="xla", rngs=nnx.Rngs(0)
    )
    assert _bias_paths(block) == set()
    assert set(_flat(nnx.to_pure_dict(nnx.state(block.norm1, nnx.Param)))) == {"scale"}
    # With the MLP's LayerScale at zero the block is x + gamma1 * out(TSSA(qkv(LN(x)))), every
    # map bias-free.
    block.gamma2[...] = jnp.zeros(8)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    attention = block.attention
    w = attention.qkv(block.norm1(x))
    y = attention.out(
        reference.token_statistics_attention(
            w, attention.temperature[...], causal=True, denom_bias=attention.denom_bias[...]
        )
    )
    want = x + block.gamma1[...][None, None] * y
    np.testing.assert_allclose(block(x), want, rtol=1e-5, atol=1e-5)
