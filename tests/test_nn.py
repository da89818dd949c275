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


def test_rotary_scores_depend_only_on_relative_position(rng):
    q = jnp.asarray(rng.standard_normal((1, 1, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 2, 16)), jnp.float32)
    score = lambda i, j: jnp.sum(
        jattn.nn.apply_rotary(q, jnp.array([i])) * jattn.nn.apply_rotary(k, jnp.array([j])), -1
    )
    assert_close(score(7, 3), np.asarray(score(104, 100), np.float64), (1e-4, 1e-4))
    assert not np.allclose(score(7, 3), score(3, 7), atol=1e-3)  # not position-blind
    with pytest.raises(ValueError, match="even head dim"):
        jattn.nn.apply_rotary(jnp.ones((1, 2, 1, 5)), jnp.arange(2))
    with pytest.raises(ValueError, match="positions"):
        jattn.nn.apply_rotary(jnp.ones((1, 2, 1, 4)), jnp.arange(3))


def test_rotary_layer_matches_manual_computation(rng):
    layer = jattn.nn.MultiHeadAttention(
        4, 32, num_kv_heads=2, is_causal=True, rope_base=500.0, rngs=nnx.Rngs(2)
    )
    x = jnp.asarray(rng.standard_normal((2, 11, 32)), jnp.float32)
    q = jnp.einsum("btd,dnh->btnh", x, layer.query.kernel[...])
    k = jnp.einsum("bsd,dkh->bskh", x, layer.key.kernel[...])
    v = jnp.einsum("bsd,dkh->bskh", x, layer.value.kernel[...])
    positions = jnp.arange(11)
    q, k = (jattn.nn.apply_rotary(t, positions, 500.0) for t in (q, k))
    encoded = jattn.reference.dot_product_attention(q, k, v, is_causal=True)
    want = jnp.einsum("btnh,nho->bto", encoded, layer.out.kernel[...])
    assert_close(layer(x), np.asarray(want, np.float64), (1e-4, 1e-4))
    # Chunked prefill: the last 4 queries at q_offset 7 see the same as rows 7..10 of the full call.
    tail = layer(x[:, 7:], x, q_offset=7)
    assert_close(tail, np.asarray(want[:, 7:], np.float64), (1e-4, 1e-4))


@pytest.mark.parametrize("num_heads, num_kv_heads, rope", [(4, 2, 10_000.0), (4, 1, None)])
def test_kv_cache_prefill_and_decode_match_the_full_forward(rng, num_heads, num_kv_heads, rope):
    """Ragged prompts (right-padded), then decode steps: each output equals the full causal call."""
    calls = []

    def spy_decode(*args, **kwargs):
        calls.append(args[0].shape)
        return jattn.decode_attention(*args, **kwargs)

    layer = jattn.nn.MultiHeadAttention(
        num_heads,
        32,
        num_kv_heads=num_kv_heads,
        is_causal=True,
        rope_base=rope,
        logits_soft_cap=20.0,
        decode_fn=spy_decode,
        rngs=nnx.Rngs(3),
    )
    x = jnp.asarray(rng.standard_normal((2, 12, 32)), jnp.float32)
    full = np.asarray(layer(x), np.float64)
    prompt_lengths = np.array([5, 3])
    layer.init_cache(2, 16)
    prompt = x[:, :5] * (np.arange(5)[None, :, None] < prompt_lengths[:, None, None])
    prefill = np.asarray(layer(prompt, decode=True, query_seq_lengths=jnp.asarray(prompt_lengths)))
    for b, p in enumerate(prompt_lengths):
        assert_close(prefill[b, :p], full[b, :p], (1e-4, 1e-4))
        assert np.all(prefill[b, p:] == 0)  # padded prompt rows
    for step in range(4):
        token = jnp.stack([x[b, p + step] for b, p in enumerate(prompt_lengths)])[:, None]
        out = np.asarray(layer(token, decode=True))
        want = np.stack([full[b, p + step] for b, p in enumerate(prompt_lengths)])[:, None]
        assert_close(out, want, (1e-4, 1e-4))
    assert layer.cache_lengths[...].tolist() == [9, 7]
    assert calls == [(2, num_heads, 32 // num_heads)] * 4  # decode steps went through decode_fn


def test_kv_cache_decode_under_nnx_jit_and_errors(rng):
    layer = jattn.nn.MultiHeadAttention(2, 16, is_causal=True, rope_base=10_000.0, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((1, 6, 16)), jnp.float32)
    with pytest.raises(ValueError, match="init_cache"):
        layer(x, decode=True)
    full = np.asarray(layer(x), np.float64)
    layer.init_cache(1, 6)
    step = nnx.jit(lambda m, t: m(t, decode=True))
    outs = [step(layer, x[:, t : t + 1]) for t in range(6)]  # token-by-token from an empty cache
    assert_close(jnp.concatenate(outs, axis=1), full, (1e-4, 1e-4))
    with pytest.raises(ValueError, match="overflow"):
        layer(x[:, :1], decode=True)
    with pytest.raises(ValueError, match="causal"):
        jattn.nn.MultiHeadAttention(2, 16, rngs=nnx.Rngs(0)).init_cache(1, 4)


def test_jattn_is_the_attention_fn_of_flax_multi_head_attention(rng):
    """The swap: flax.nnx.MultiHeadAttention(attention_fn=jattn...) gives Flax's own result."""
    make = lambda **kw: nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(5), **kw)
    flax_layer = make()
    jattn_layer = make(attention_fn=jattn.nn.flax_attention_fn(implementation="xla_chunked"))
    x = jnp.asarray(rng.standard_normal((2, 9, 32)), jnp.float32)
    valid = jnp.arange(9)[None] < jnp.array([[9], [6]])  # padding: second sequence has 6 tokens
    mask = nnx.combine_masks(
        nnx.make_causal_mask(jnp.ones((2, 9))), nnx.make_attention_mask(valid, valid)
    )
    loss = lambda m: jnp.sum(jnp.where(valid[..., None], m(x, mask=mask), 0.0) ** 2)
    want, want_grads = nnx.value_and_grad(loss)(flax_layer)
    got, got_grads = nnx.value_and_grad(loss)(jattn_layer)
    assert_close(got, np.asarray(want, np.float64), (1e-4, 1e-4))
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(g, np.asarray(w, np.float64), (1e-4, 1e-4))
    with pytest.raises(NotImplementedError, match="dropout"):
        make(attention_fn=jattn.nn.flax_attention_fn(), dropout_rate=0.1)(x, deterministic=False)
