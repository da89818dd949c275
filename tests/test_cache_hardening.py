"""KV caches never drop a token silently: `jattn.offload.KVCache`, `jattn.nn.MultiHeadAttention`'s
cache and `models.gpt.generate`; `KVCache.create` checks its lengths; `sharded_decode_attention`
takes inputs placed on other devices than its mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import offload

import oracle
from cases import TOLERANCE, assert_close


def small_cache(shard_by="heads", lengths=None, capacity=4, devices=2):
    mesh = offload.make_mesh(jax.devices()[:devices])
    return offload.KVCache.create(
        mesh, num_layers=1, batch=2, capacity=capacity, kv_heads=2, head_dim=8,
        dtype=jnp.float32, shard_by=shard_by, lengths=lengths,
    )  # fmt: skip


def test_kv_cache_full_raises_eagerly(rng):
    cache = small_cache(lengths=np.array([4, 1]))
    new = jnp.asarray(rng.standard_normal((2, 2, 8)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    with pytest.raises(ValueError, match=r"KV cache full: lengths \[4, 1\] with capacity 4"):
        offload.append(cache, 0, new, new)
    with pytest.raises(ValueError, match="KV cache full"):
        offload.append_and_attend(cache, 0, q, new, new)
    with pytest.raises(ValueError, match="KV cache full"):
        offload.advance(cache)
    cache.check()  # nothing was dropped


@pytest.mark.parametrize("shard_by", ["heads", "sequence"])
def test_kv_cache_overflow_under_jit_sets_a_sticky_flag(rng, shard_by):
    """Under a trace the token of a full sequence is dropped (the cache is unchanged, the length
    stays at the capacity) and `overflow` records it; `check()` then raises."""
    capacity, steps = 4, 6
    cache = small_cache(shard_by, lengths=np.array([0, 2]), capacity=capacity)
    news = jnp.asarray(rng.standard_normal((steps, 2, 2, 8)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)

    @jax.jit
    def step(cache, new):
        cache, out = offload.append_and_attend(cache, 0, q, new, new)
        return offload.advance(cache), out

    overflow = []
    for i in range(steps):
        cache, out = step(cache, news[i])
        overflow.append(np.asarray(cache.overflow).tolist())
        assert np.all(np.isfinite(np.asarray(out)))
    # Sequence 1 starts at 2: full after 2 steps, its 3rd token is the first one dropped.
    assert overflow == [[False, False]] * 2 + [[False, True]] * 2 + [[True, True]] * 2
    np.testing.assert_array_equal(np.asarray(cache.lengths), [capacity, capacity])
    keys = np.asarray(cache.in_token_order(cache.keys[0]))
    np.testing.assert_array_equal(keys[0], np.asarray(news[:capacity, 0]))  # steps 0..3
    np.testing.assert_array_equal(keys[1, 2:], np.asarray(news[:2, 1]))  # steps 0, 1 only
    np.testing.assert_array_equal(keys[1, :2], 0.0)
    want, _ = oracle.decode(
        np.asarray(q, np.float64), keys.astype(np.float64), keys.astype(np.float64),
        np.array([capacity, capacity]),
    )  # fmt: skip
    assert_close(out, want, TOLERANCE[jnp.float32])  # attends over the S cached tokens
    with pytest.raises(ValueError, match=r"sequences \[0, 1\] were full \(capacity 4\)"):
        cache.check()


@pytest.mark.parametrize(
    "lengths, message",
    [
        (np.array([1, 5]), r"lengths must lie in \[0, capacity = 4\], got \[1, 5\]"),
        (np.array([-1, 0]), r"lengths must lie in \[0, capacity = 4\]"),
        (np.array([1, 2, 3]), r"lengths must be integers of shape \[batch\] = \(2,\)"),
        (np.array([[1, 2]]), r"lengths must be integers of shape"),
        (np.array([1.5, 2.0]), r"lengths must be integers of shape"),
    ],
)
def test_kv_cache_create_checks_lengths(lengths, message):
    with pytest.raises(ValueError, match=message):
        small_cache(lengths=lengths)


def test_kv_cache_create_checks_sizes():
    mesh = offload.make_mesh(jax.devices()[:1])
    for bad in (dict(batch=0), dict(capacity=-1), dict(num_layers=1.0), dict(head_dim=True)):
        sizes = dict(num_layers=1, batch=2, capacity=4, kv_heads=2, head_dim=8) | bad
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an int >= 1"):
            offload.KVCache.create(mesh, **sizes)


@pytest.mark.parametrize("shard_by", ["heads", "sequence"])
def test_sharded_decode_takes_inputs_on_other_devices(rng, shard_by):
    """The cache placed on devices 0-1, the mesh over devices 4-7: moved onto the mesh first."""
    batch, capacity, kv_heads, dim = 2, 8, 4, 8
    q = jnp.asarray(rng.standard_normal((batch, 8, dim)), jnp.float32)
    k, v = (
        jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), jnp.float32)
        for _ in range(2)
    )
    lengths = np.array([3, 8])
    elsewhere = jax.sharding.NamedSharding(
        offload.make_mesh(jax.devices()[:2]), offload.cache_spec(shard_by, "attn")
    )
    k, v = jax.device_put(k, elsewhere), jax.device_put(v, elsewhere)
    q = jax.device_put(q, jax.devices()[1])
    mesh = offload.make_mesh(jax.devices()[4:])
    out = offload.sharded_decode_attention(q, k, v, lengths, mesh=mesh, shard_by=shard_by)
    want, _ = oracle.decode(
        *(np.asarray(x, np.float64) for x in (q, k, v)), lengths
    )  # fmt: skip
    assert_close(out, want, TOLERANCE[jnp.float32])
    assert out.sharding.device_set == set(jax.devices()[4:])


# ------------------------------------------------------------------------------------------------
# jattn.nn.MultiHeadAttention's cache


def test_nn_cache_overflow_under_nnx_jit_is_flagged_not_silent(rng):
    """Capacity 15, a 14-token prefill, then decode steps under nnx.jit: the 16th token is not
    written (no earlier slot changes), cache_lengths stops at 15, cache_overflow is set and
    check_cache() raises."""
    from flax import nnx

    import jattn

    layer = jattn.nn.MultiHeadAttention(2, 16, is_causal=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32)
    layer.init_cache(2, 15)
    step = nnx.jit(lambda m, t: m(t, decode=True))
    layer(x[:, :14], decode=True)
    out = step(layer, x[:, 14:15])
    assert layer.cache_lengths[...].tolist() == [15, 15]
    assert layer.cache_overflow[...].tolist() == [False, False]
    layer.check_cache()
    keys = np.asarray(layer.cached_key[...])
    out = step(layer, x[:, 15:16])
    assert np.all(np.isfinite(np.asarray(out)))
    assert layer.cache_lengths[...].tolist() == [15, 15]
    assert layer.cache_overflow[...].tolist() == [True, True]
    np.testing.assert_array_equal(np.asarray(layer.cached_key[...]), keys)  # nothing overwritten
    with pytest.raises(ValueError, match=r"sequences \[0, 1\] reached the capacity 15"):
        layer.check_cache()
    with pytest.raises(ValueError, match="overflow"):
        layer(x[:, :1], decode=True)  # eager: raises


def test_nn_prefill_lengths_never_count_unwritten_tokens(rng):
    from flax import nnx

    import jattn

    layer = jattn.nn.MultiHeadAttention(2, 16, is_causal=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 4, 16)), jnp.float32)
    layer.init_cache(2, 8)
    with pytest.raises(ValueError, match=r"query_seq_lengths must lie in \[0, T = 4\]"):
        layer(x, decode=True, query_seq_lengths=jnp.array([2, 6]))
    with pytest.raises(ValueError, match=r"query_seq_lengths must lie in \[0, T = 4\]"):
        layer(x, decode=True, query_seq_lengths=jnp.array([-1, 2]))
    assert layer.cache_lengths[...].tolist() == [0, 0]
    prefill = nnx.jit(lambda m, t, n: m(t, decode=True, query_seq_lengths=n))
    prefill(layer, x, jnp.array([2, 6]))  # traced: clamped to the 4 tokens written
    assert layer.cache_lengths[...].tolist() == [2, 4]
    assert layer.cache_overflow[...].tolist() == [False, False]


def test_generate_with_a_cache_too_small_raises(rng):
    from flax import nnx

    from models import gpt

    config = gpt.GPTConfig(num_layers=1, dim=32, num_heads=2, num_kv_heads=1, max_length=32)
    model = gpt.GPT(config, rngs=nnx.Rngs(0))
    prompt = jnp.asarray(rng.integers(0, 256, (2, 5)), jnp.int32)
    with pytest.raises(ValueError, match=r"cache_length 8 is too small.*need 9 positions"):
        gpt.generate(model, prompt, 4, cache_length=8)
    with pytest.raises(ValueError, match=r"cache_length 6 is too small.*need 7"):
        gpt.generate(model, prompt, 4, prompt_lengths=jnp.array([3, 2]), cache_length=6)
    with pytest.raises(ValueError, match=r"prompt_lengths must be \[B\]"):
        gpt.generate(model, prompt, 4, prompt_lengths=jnp.array([6, 2]))
    got = gpt.generate(model, prompt, 4, prompt_lengths=jnp.array([3, 2]), cache_length=7)
    assert got.shape == (2, 4)
    for layer in model.blocks:
        layer.attention.check_cache()


def test_cache_append_takes_tokens_on_other_devices(rng):
    cache = small_cache("sequence", lengths=np.array([0, 1]))  # on devices 0-1
    new = jax.device_put(jnp.asarray(rng.standard_normal((2, 2, 8)), jnp.float32), jax.devices()[5])
    q = jax.device_put(jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32), jax.devices()[6])
    cache = offload.append(cache, 0, new, new)
    cache, out = offload.append_and_attend(cache, 0, q, new, new)
    keys = np.asarray(cache.in_token_order(cache.keys[0]))
    np.testing.assert_array_equal(keys[0, 0], np.asarray(new[0]))
    np.testing.assert_array_equal(keys[1, 1], np.asarray(new[1]))
    assert out.shape == (2, 4, 8) and np.all(np.isfinite(np.asarray(out)))
