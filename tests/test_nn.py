"""jattn.nn.MultiHeadAttention (Flax NNX)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn

from cases import TOLERANCE, assert_close


def _manual(layer, x, context, **options):
    """The layer's math written out: project, reference attention, project back."""
    q = jnp.einsum("btd,dnh->btnh", x, layer.query.kernel[...])
    k = jnp.einsum("bsd,dkh->bskh", context, layer.key.kernel[...])
    v = jnp.einsum("bsd,dkh->bskh", context, layer.value.kernel[...])
    encoded = jattn.reference.dot_product_attention(q, k, v, **options)
    return jnp.einsum("btnh,nho->bto", encoded, layer.out.kernel[...])


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_gqa_layer_matches_manual_computation(rng, num_heads, num_kv_heads):
    layer = jattn.nn.MultiHeadAttention(
        num_heads, 48, num_kv_heads=num_kv_heads, is_causal=True, rngs=nnx.Rngs(0)
    )
    assert layer.key.kernel[...].shape == (48, num_kv_heads, 48 // num_heads)
    x = jnp.asarray(rng.standard_normal((2, 9, 48)), jnp.float32)
    lengths = jnp.array([9, 4])
    got = layer(x, key_value_seq_lengths=lengths)
    want = _manual(layer, x, x, is_causal=True, key_value_seq_lengths=lengths)
    assert got.shape == (2, 9, 48)
    assert_close(got, np.asarray(want, np.float64), (1e-4, 1e-4))


def test_cross_attention_with_head_dim_and_out_features(rng):
    layer = jattn.nn.MultiHeadAttention(
        4, 16, num_kv_heads=2, head_dim=12, out_features=10, rngs=nnx.Rngs(1)
    )
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 13, 16)), jnp.float32)
    got = layer(x, context)
    assert got.shape == (2, 5, 10)
    assert_close(got, np.asarray(_manual(layer, x, context), np.float64), (1e-4, 1e-4))


def test_implementations_agree_and_the_choice_reaches_dispatch(rng):
    x = jnp.asarray(rng.standard_normal((2, 21, 32)), jnp.float32)
    outputs = []
    for implementation, config in [("xla", None), ("xla_chunked", jattn.ChunkedConfig(block_k=4))]:
        layer = jattn.nn.MultiHeadAttention(
            4,
            32,
            num_kv_heads=2,
            is_causal=True,
            logits_soft_cap=5.0,
            implementation=implementation,
            config=config,
            rngs=nnx.Rngs(0),
        )
        outputs.append(np.asarray(layer(x), np.float64))
    assert_close(outputs[1], outputs[0], TOLERANCE[jnp.float32])
    if jax.default_backend() != "gpu":
        layer = jattn.nn.MultiHeadAttention(4, 32, implementation="cudnn", rngs=nnx.Rngs(0))
        with pytest.raises(NotImplementedError, match="cuDNN needs a CUDA GPU"):
            layer(x)


def test_layer_trains_under_nnx_jit(rng):
    layer = jattn.nn.MultiHeadAttention(4, 16, num_kv_heads=2, is_causal=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)

    @nnx.jit
    def loss_and_grad(layer):
        return nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(layer)

    loss, grads = loss_and_grad(layer)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert np.isfinite(float(loss)) and len(leaves) == 4
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_bad_head_configuration_is_a_value_error():
    with pytest.raises(ValueError, match="num_heads \\(6\\) must be a multiple of num_kv_heads"):
        jattn.nn.MultiHeadAttention(6, 48, num_kv_heads=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        jattn.nn.MultiHeadAttention(5, 48, rngs=nnx.Rngs(0))
