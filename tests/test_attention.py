"""jattn.dot_product_attention: argument checks, dispatch, and every XLA implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn

from cases import (
    FEATURES,
    GRAD_TOLERANCE,
    SHAPES,
    TOLERANCE,
    assert_close,
    check_against_oracle,
    make_inputs,
    make_options,
)

# Small tiles, so the chunked scans run several steps and pad the last query and key blocks.
IMPLEMENTATIONS = {
    "xla": None,
    "xla_chunked": jattn.ChunkedConfig(block_q=4, block_k=8),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_implementation_matches_oracle(rng, implementation, feature, dtype):
    shape = SHAPES["gqa4_t_lt_s"] if feature != "plain" else SHAPES["mqa8_t_gt_s"]
    options = make_options(rng, feature, shape)
    config = IMPLEMENTATIONS[implementation]
    check_against_oracle(rng, shape, options, dtype, implementation, config)


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("block_q, block_k", [(1, 7), (5, 1), (7, 64), (64, 3)])
def test_chunked_block_sizes_match_reference(rng, shape_name, block_q, block_k):
    q, k, v = make_inputs(rng, SHAPES[shape_name])
    options = dict(is_causal=True, q_offset=q.shape[1] // 2, logits_soft_cap=3.0)
    want = jattn.reference.dot_product_attention(q, k, v, **options)
    got = jattn.dot_product_attention(
        q,
        k,
        v,
        implementation="xla_chunked",
        config=jattn.ChunkedConfig(block_q=block_q, block_k=block_k),
        **options,
    )
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


def test_chunked_survives_very_negative_logits(rng):
    """All logits near -200: an online softmax that starts its max at 0 would underflow to 0."""
    q, k, v = make_inputs(rng, (1, 5, 19, 2, 2, 8))
    bias = jnp.full((1, 1, 5, 19), -200.0)
    want = jattn.reference.dot_product_attention(q, k, v, bias)
    got = jattn.dot_product_attention(
        q, k, v, bias, implementation="xla_chunked", config=jattn.ChunkedConfig(block_k=4)
    )
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


def test_chunked_skips_blocks_no_query_can_see(rng):
    """NaN keys/values in blocks hidden from every query never reach the result: the blocks
    are skipped, not computed and masked (0 * NaN would be NaN)."""
    q, k, v = make_inputs(rng, (2, 8, 24, 4, 2, 16))
    lengths = jnp.array([8, 5], jnp.int32)  # blocks [8, 16) and [16, 24) hidden from all
    poisoned_k, poisoned_v = (x.at[:, 8:].set(jnp.nan) for x in (k, v))
    loss = lambda q, k, v: jnp.sum(
        jnp.sin(
            jattn.dot_product_attention(
                q,
                k,
                v,
                key_value_seq_lengths=lengths,
                implementation="xla_chunked",
                config=jattn.ChunkedConfig(block_k=8),
            )
        )
    )
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, poisoned_k, poisoned_v)
    want, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k[:, :8], v[:, :8])
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close(got[:, :8], np.asarray(expected, np.float64), GRAD_TOLERANCE[jnp.float32])
    assert np.all(np.asarray(grads[1][:, 8:]) == 0) and np.all(np.asarray(grads[2][:, 8:]) == 0)


def test_chunked_backward_does_not_store_the_score_matrix():
    batch, length, heads, dim = 1, 2048, 1, 16
    x = jnp.ones((batch, length, heads, dim))
    score_matrix_bytes = length * length * 4

    def temp_bytes(implementation, config):
        loss = lambda q, k, v: jnp.sum(
            jattn.dot_product_attention(q, k, v, implementation=implementation, config=config)
        )
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla", None) >= score_matrix_bytes  # the check can see a T x S buffer
    small_tiles = jattn.ChunkedConfig(block_q=256, block_k=64)
    assert temp_bytes("xla_chunked", small_tiles) < score_matrix_bytes / 8


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_backward_is_deterministic(rng, implementation):
    q, k, v = make_inputs(rng, SHAPES["gqa4_t_lt_s"])
    loss = lambda q, k, v: jnp.sum(
        jnp.sin(
            jattn.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                implementation=implementation,
                config=IMPLEMENTATIONS[implementation],
            )
        )
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for first, second in zip(grad(q, k, v), grad(q, k, v), strict=True):
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("implementation", [None, *IMPLEMENTATIONS])
def test_drop_in_for_jax_nn_including_unbatched_inputs(rng, implementation):
    q, k, v = make_inputs(rng, SHAPES["gqa2_h20"])
    mask = jnp.asarray(rng.random((1, 1, 16, 16)) < 0.8) | jnp.eye(16, dtype=bool)[None, None]
    for args in ((q, k, v), (q[0], k[0], v[0])):
        want = jax.nn.dot_product_attention(*args, mask=mask, is_causal=True)
        got = jax.jit(
            lambda q, k, v: jattn.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, implementation=implementation
            )
        )(*args)
        assert got.shape == want.shape
        assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


# --- dispatch -----------------------------------------------------------------------------------


def test_auto_selection_on_cpu_is_chunked_then_xla():
    assert jattn.auto_order("cpu") == ("xla_chunked", "xla")
    assert {"xla", "xla_chunked", "cudnn"} <= set(jattn.available_implementations())


def test_unknown_implementation_is_a_value_error(rng):
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    with pytest.raises(ValueError, match="Unknown implementation 'flash'"):
        jattn.dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU decline")
def test_cudnn_declines_with_its_reason(rng):
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    with pytest.raises(NotImplementedError, match="cudnn: cuDNN needs a CUDA GPU"):
        jattn.dot_product_attention(q, k, v, implementation="cudnn")


def test_an_unregistered_kernel_declines(rng, monkeypatch):
    from jattn import attention

    monkeypatch.delitem(attention._REGISTRY, "mosaic")
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    with pytest.raises(NotImplementedError, match="mosaic: not available"):
        jattn.dot_product_attention(q, k, v, implementation="mosaic")


def test_mosaic_declines_float32_with_its_reason(rng):
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    with pytest.raises(NotImplementedError, match="mosaic: .*float16/bfloat16.*Triton"):
        jattn.dot_product_attention(q, k, v, implementation="mosaic")


def test_a_declining_implementation_falls_through_to_the_next(rng, monkeypatch):
    calls = []

    def declines(args, config):
        calls.append(args.shape_summary)
        raise NotImplementedError("declines everything")

    from jattn import attention

    monkeypatch.setitem(attention._REGISTRY, "mosaic", declines)
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    got = jattn.dot_product_attention(q, k, v, implementation=("mosaic", "xla"))
    assert calls and np.isfinite(np.asarray(got)).all()
    with pytest.raises(NotImplementedError, match="mosaic: declines everything"):
        jattn.dot_product_attention(q, k, v, implementation="mosaic")


def test_a_foreign_config_is_declined_not_ignored(rng):
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    with pytest.raises(ValueError, match="'xla' takes no config, got a ChunkedConfig"):
        jattn.dot_product_attention(q, k, v, implementation="xla", config=jattn.ChunkedConfig())


# --- argument checks ------------------------------------------------------------------------------

B, T, S, N, K, H = 2, 5, 7, 4, 2, 8


def _call(**overrides):
    arrays = dict(
        query=jnp.ones((B, T, N, H)), key=jnp.ones((B, S, K, H)), value=jnp.ones((B, S, K, H))
    )
    arrays.update({k: v for k, v in overrides.items() if k in arrays})
    options = {k: v for k, v in overrides.items() if k not in arrays}
    return jattn.dot_product_attention(**arrays, **options)


BAD_CALLS = {
    "rank": (dict(query=jnp.ones((B, T, N * H))), r"rank 4.*query \(2, 5, 32\)"),
    "head_dim": (dict(query=jnp.ones((B, T, N, H + 1))), r"head dim H.*query \(2, 5, 4, 9\)"),
    "gqa": (dict(query=jnp.ones((B, T, 3, H))), r"multiple of kv heads.*query \(2, 5, 3, 8\)"),
    "kv_mismatch": (dict(value=jnp.ones((B, S + 1, K, H))), r"same shape.*value \(2, 8, 2, 8\)"),
    "batch": (dict(query=jnp.ones((B + 1, T, N, H))), r"batch size.*query \(3, 5, 4, 8\)"),
    "dtype_mix": (dict(key=jnp.ones((B, S, K, H), jnp.bfloat16)), r"one dtype.*bfloat16"),
    "int_dtype": (
        dict(
            query=jnp.ones((B, T, N, H), jnp.int32),
            key=jnp.ones((B, S, K, H), jnp.int32),
            value=jnp.ones((B, S, K, H), jnp.int32),
        ),
        "one dtype",
    ),
    "bias_shape": (dict(bias=jnp.ones((B, N, T, S + 1))), r"bias of shape \(2, 4, 5, 8\)"),
    "bias_heads": (dict(bias=jnp.ones((1, K, T, S))), r"bias of shape \(1, 2, 5, 7\)"),
    "bias_rank": (dict(bias=jnp.ones((1, B, N, T, S))), "rank <= 4"),
    "mask_dtype": (dict(mask=jnp.ones((T, S))), "mask must be boolean"),
    "mask_shape": (dict(mask=jnp.ones((T + 1, S), bool)), r"mask of shape \(1, 1, 6, 7\)"),
    "q_lengths": (dict(query_seq_lengths=jnp.ones((B + 1,), jnp.int32)), r"\[B\] = \(2,\)"),
    "kv_lengths_dtype": (dict(key_value_seq_lengths=jnp.ones((B,))), "integer array"),
    "q_offset": (dict(q_offset=jnp.zeros((B, 1), jnp.int32)), r"q_offset must have shape"),
    "segments_shape": (
        dict(segment_ids=(jnp.zeros((B, T), jnp.int32), jnp.zeros((B, T), jnp.int32))),
        r"segment_ids must have shapes.*\(2, 7\)",
    ),
    "segments_pair": (dict(segment_ids=jnp.zeros((B, T), jnp.int32)), "pair"),
    "window": (dict(local_window_size=(-1, 2)), "local_window_size"),
    "soft_cap": (dict(logits_soft_cap=0.0), "logits_soft_cap must be > 0"),
    "scale_shape": (dict(scale=np.ones(2)), r"scale must be a scalar, got shape \(2,\)"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_is_a_value_error_naming_the_problem(case):
    overrides, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_scale_as_a_concrete_array_is_accepted_and_a_traced_one_is_named(rng):
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    got = jattn.dot_product_attention(q, k, v, scale=jnp.float32(0.3))
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])
    traced = jax.jit(lambda s: jattn.dot_product_attention(q, k, v, scale=s))
    with pytest.raises(ValueError, match="scale must be concrete"):
        traced(0.3)


def test_checks_run_before_tracing_under_jit():
    bad = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="head dim"):
        bad(jnp.ones((B, T, N, H)), jnp.ones((B, S, K, H + 1)), jnp.ones((B, S, K, H + 1)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_batch_sharded_over_eight_devices_equals_unsharded(rng, implementation):
    devices = jax.devices("cpu")
    assert len(devices) == 8  # conftest's --xla_force_host_platform_device_count
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    q, k, v = make_inputs(rng, (8, 11, 19, 4, 2, 16))
    lengths = jnp.asarray(rng.integers(0, 20, 8), jnp.int32)

    def loss(q, k, v, lengths):
        out = jattn.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            q_offset=8,
            key_value_seq_lengths=lengths,
            implementation=implementation,
            config=IMPLEMENTATIONS[implementation],
        )
        return jnp.sum(jnp.sin(out)), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = step(q, k, v, lengths)
    sharded = [jax.device_put(x, sharding) for x in (q, k, v, lengths)]
    (_, out_sharded), grads_sharded = step(*sharded)
    assert out_sharded.sharding.is_equivalent_to(sharding, out.ndim)
    for a, b in zip((out, *grads), (out_sharded, *grads_sharded), strict=True):
        assert_close(b, np.asarray(a, np.float64), TOLERANCE[jnp.float32])
