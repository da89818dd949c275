"""ToST layers and models against the official code (github.com/RobinWu218/ToST): which
parameters decay, which have biases, and the block's LayerNorm precision in float32."""

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
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
