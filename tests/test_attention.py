"""jattn.dot_product_attention: argument checks, dispatch, and every XLA implementation."""

import functools
import logging

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


# Low precision changes no branch, only casts ('xla' computes in float32 and rounds its results;
# 'xla_chunked' accumulates in float32 and rounds matmul operands, probabilities and score
# gradients to the input dtype), and float16 and bfloat16 take the same path. Every feature runs
# in float32; in the default run, bfloat16 runs where the dtype meets the feature (the bias, cast
# to the input dtype; fully masked rows; the combined cases, which hold causal, offsets, windows,
# soft cap, segments and lengths) and float16 on a subset of those. The other low-precision cases
# repeat those paths with other rounding and run with `-m slow` (46 cases, ~43 s of test time).
LOW_PRECISION_DEFAULT_RUN = {
    jnp.float32: FEATURES,
    jnp.bfloat16: ("plain", "lengths_empty", "mask", "bias_full", "bias_broadcast", "bias_2d",
                   "bias_per_query", "causal_window_bias_softcap", "segments_causal_lengths"),
    jnp.float16: ("plain", "lengths_empty", "causal_window_bias_softcap",
                  "segments_causal_lengths"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("feature", "dtype"),
    [
        (f, d) if f in LOW_PRECISION_DEFAULT_RUN[d] else pytest.param(f, d, marks=pytest.mark.slow)
        for f in FEATURES
        for d in (jnp.float32, jnp.bfloat16, jnp.float16)
    ],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_implementation_matches_oracle(rng, implementation, feature, dtype):
    shape = SHAPES["gqa4_t_lt_s"] if feature != "plain" else SHAPES["mqa8_t_gt_s"]
    options = make_options(rng, feature, shape)
    config = IMPLEMENTATIONS[implementation]
    check_against_oracle(rng, shape, options, dtype, implementation, config)


# One-row query blocks take about 1.7 s a shape here (the other block sizes 0.3-0.9 s): in the
# default run on the shapes with T > S, T < S and T = S; on the others (the same scan, with head
# counts and dims that the other block sizes cover on every shape) with `-m slow`.
ONE_ROW_BLOCKS_DEFAULT_RUN = ("mqa8_t_gt_s", "gqa4_t_lt_s", "mha_square")


@pytest.mark.parametrize(
    ("shape_name", "block_q", "block_k"),
    [
        (s, bq, bk)
        if bq != 1 or s in ONE_ROW_BLOCKS_DEFAULT_RUN
        else pytest.param(s, bq, bk, marks=pytest.mark.slow)
        for bq, bk in [(1, 7), (5, 1), (7, 64), (64, 3)]
        for s in SHAPES
    ],
)
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


@pytest.mark.parametrize(
    "options",
    [
        dict(is_causal=True),
        dict(key_value_seq_lengths=np.array([29, 0], np.int32)),  # batch row 1 sees no key
        dict(mask=np.tril(np.ones((13, 29), bool), -3)),  # rows 0-2 see no key
    ],
    ids=["causal", "lengths_with_empty_sequence", "mask_with_empty_rows"],
)
def test_cudnn_lse_gradient_matches_the_reference(options, monkeypatch):
    """jattn.cudnn gives cuDNN's lse the gradient that cuDNN's backward drops. Its formula
    (attention with K as values, and that attention's value gradient) checked here with XLA
    standing in for cuDNN; the GPU test runs the real one. GQA, T != S."""
    from jattn import attention, cudnn

    def xla_as_jax_nn(args, value, *, return_residual):
        return jax.nn.dot_product_attention(
            args.query,
            args.key,
            value,
            mask=args.mask,
            scale=args.scale,
            is_causal=args.is_causal,
            key_value_seq_lengths=args.key_value_seq_lengths,
            implementation="xla",
            return_residual=return_residual,
        )

    monkeypatch.setattr(cudnn, "_jax_nn", xla_as_jax_nn)
    keys = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(keys[0], (2, 13, 8, 40))  # [B, T, N, H]
    k = jax.random.normal(keys[1], (2, 29, 2, 40))  # [B, S, K, H]: 4 query heads per key head
    v = jax.random.normal(keys[2], (2, 29, 2, 40))
    d_lse = jax.random.normal(keys[3], (2, 13, 8))
    if "mask" in options:
        options = dict(mask=jnp.asarray(options["mask"])[None, None])

    def loss(q, k, through_cudnn):
        args = attention.check_attention_args(q, k, v, **options)
        _, lse = attention._run(args, "xla", None)
        if through_cudnn:  # the value alone, with jattn.cudnn's gradient
            lse = cudnn._lse_with_gradient(args, jax.lax.stop_gradient(lse))
        return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * d_lse)

    got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(q, k, True)
    want = jax.grad(loss, (0, 1))(q, k, False)
    assert float(jnp.abs(want[0]).max()) > 0.1  # the lse's gradient is there to match
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


def test_lse_needed_follows_return_residual(monkeypatch):
    """The public call tells implementations whether it keeps the lse (cuDNN skips its
    softmax statistics when not); internal callers (ring attention's merge) keep the default."""
    from jattn import attention

    seen = []

    def recording(args, config):
        seen.append(args.lse_needed)
        return attention._xla(args, config)

    monkeypatch.setitem(attention._REGISTRY, "cudnn", recording)
    q = jnp.ones((1, 3, 2, 8))
    jattn.dot_product_attention(q, q, q, implementation="cudnn")
    jattn.dot_product_attention(q, q, q, implementation="cudnn", return_residual=True)
    assert seen == [False, True]
    assert attention.check_attention_args(q, q, q).lse_needed


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


BAD_CALLS["layout_bnth"] = (  # [B, N, T, H] arrays: the error names the expected layout
    dict(query=jnp.ones((B, N, T, H)), key=jnp.ones((B, K, S, H)), value=jnp.ones((B, K, S, H))),
    r"multiple of kv heads.*\[B, T, N, H\] layout",
)
BAD_CALLS["head_dim_0"] = (
    dict(query=jnp.ones((B, T, N, 0)), key=jnp.ones((B, S, K, 0)), value=jnp.ones((B, S, K, 0))),
    "head dim H must be >= 1",
)
BAD_CALLS["kv_lengths_above_s"] = (
    dict(key_value_seq_lengths=jnp.array([S + 1, 1])),
    r"\[0, S = 7\]",
)
BAD_CALLS["q_lengths_negative"] = (dict(query_seq_lengths=jnp.array([-1, 1])), r"\[0, T = 5\]")


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_is_a_value_error_naming_the_problem(case):
    overrides, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


@pytest.mark.parametrize("implementation", [None, "xla", "triton"])
def test_scale_concrete_or_traced_matches_jax_nn_with_its_gradient(rng, implementation):
    """A learnable temperature under jit: the value and d/d scale equal jax.nn's."""
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    got = jattn.dot_product_attention(q, k, v, scale=jnp.float32(0.3))
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(scale, fn, **options):
        return jnp.sum(fn(q, k, v, scale=scale, is_causal=True, **options) * cotangent)

    ours = functools.partial(jattn.dot_product_attention, implementation=implementation)
    value, d_scale = jax.jit(jax.value_and_grad(loss), static_argnums=1)(0.3, ours)
    want_value, want_d_scale = jax.value_and_grad(loss)(0.3, jax.nn.dot_product_attention)
    assert_close(value, np.float64(want_value), TOLERANCE[jnp.float32])
    assert_close(d_scale, np.float64(want_d_scale), GRAD_TOLERANCE[jnp.float32])
    with pytest.raises(ValueError, match="scale must be a real scalar"):
        jax.jit(lambda s: jattn.dot_product_attention(q, k, v, scale=s))(jnp.ones(2))


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


# --- degenerate shapes, drop-in gaps (issue 19) ---------------------------------------------

ALL_IMPLEMENTATIONS = {
    **IMPLEMENTATIONS,
    "triton": jattn.TritonConfig(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16),
    None: None,
}


@pytest.mark.parametrize("implementation", ALL_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "shape",  # (B, T, S, N, K, H) with one size 0
    [(2, 5, 0, 4, 2, 8), (2, 0, 6, 4, 2, 8), (0, 5, 6, 4, 2, 8), (2, 5, 6, 0, 2, 8)],
    ids=["S=0", "T=0", "B=0", "N=0"],
)
def test_empty_shapes_are_served_alike_by_every_implementation(rng, implementation, shape):
    """S = 0: every row sees nothing (output 0, lse -inf, zero gradients); T, B, N = 0: empty."""
    q, k, v = make_inputs(rng, shape)
    config = ALL_IMPLEMENTATIONS[implementation]

    def run(q, k, v):
        return jattn.dot_product_attention(
            q, k, v, return_residual=True, implementation=implementation, config=config
        )

    (out, lse), vjp = jax.vjp(run, q, k, v)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    np.testing.assert_array_equal(np.asarray(out), np.zeros(q.shape))
    np.testing.assert_array_equal(np.asarray(lse), np.full(q.shape[:3], -np.inf))
    for grad, x in zip(vjp((jnp.ones_like(out), jnp.zeros_like(lse))), (q, k, v), strict=True):
        assert grad.shape == x.shape
        np.testing.assert_array_equal(np.asarray(grad), np.zeros(x.shape))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_lse_comes_back_in_the_input_dtype_as_jax_nn_returns_it(rng, dtype):
    """jax.nn's tests take a vjp with an lse cotangent in the input dtype: that must work."""
    q, k, v = make_inputs(rng, SHAPES["mha_square"], dtype)
    want_out, want_lse = jax.nn.dot_product_attention(q, k, v, return_residual=True)
    (out, lse), vjp = jax.vjp(
        lambda q, k, v: jattn.dot_product_attention(q, k, v, return_residual=True), q, k, v
    )
    assert lse.dtype == want_lse.dtype == dtype and out.dtype == dtype
    assert_close(lse, np.asarray(want_lse.astype(jnp.float32), np.float64), TOLERANCE[dtype])
    grads = vjp((jnp.ones_like(out), jnp.zeros_like(lse)))
    assert all(g.dtype == dtype for g in grads)


@pytest.mark.parametrize("implementation", ALL_IMPLEMENTATIONS)
def test_boolean_and_integer_bias_are_added_as_jax_nn_adds_them(rng, implementation):
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    config = ALL_IMPLEMENTATIONS[implementation]
    for bias in (rng.random((1, 4, 7, 7)) < 0.5, rng.integers(-2, 3, size=(2, 1, 7, 7))):
        bias = jnp.asarray(bias)
        want = jax.nn.dot_product_attention(q, k, v, bias)
        got = jattn.dot_product_attention(
            q, k, v, bias, implementation=implementation, config=config
        )
        assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


@pytest.mark.parametrize("implementation", ALL_IMPLEMENTATIONS)
def test_traced_lengths_out_of_range_are_clamped_alike(rng, implementation):
    """Traced lengths cannot raise: above T/S they mean T/S, below 0 they mean 0, on every
    implementation (the Triton kernel used to show its zero padding keys past S)."""
    q, k, v = make_inputs(rng, (2, 3, 20, 2, 1, 16))
    config = ALL_IMPLEMENTATIONS[implementation]
    run = jax.jit(
        lambda q_lengths, kv_lengths: jattn.dot_product_attention(
            q,
            k,
            v,
            query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths,
            return_residual=True,
            implementation=implementation,
            config=config,
        )
    )
    got_out, got_lse = run(jnp.array([7, -2]), jnp.array([33, 21]))
    want_out, want_lse = jattn.reference.dot_product_attention(
        q, k, v, query_seq_lengths=jnp.array([3, 0]), return_residual=True
    )
    assert_close(got_out, np.asarray(want_out, np.float64), TOLERANCE[jnp.float32])
    np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    finite = np.isfinite(np.asarray(want_lse))
    assert_close(np.asarray(got_lse)[finite], np.asarray(want_lse)[finite], TOLERANCE[jnp.float32])


def test_eager_calls_compile_once_per_signature(rng, caplog):
    """The default path is jitted per static signature: a repeated eager call compiles nothing."""
    q, k, v = make_inputs(rng, SHAPES["gqa4_t_lt_s"])
    call = lambda: jattn.dot_product_attention(q, k, v, is_causal=True, q_offset=3)
    call()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        call()
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_flax_attention_fn_takes_extra_leading_batch_axes(rng):
    """Flax's attention_fn contract: `[batch..., L, N, H]`, mask `[batch..., N, T, S]`."""
    from jattn.nn.attention import flax_attention_fn

    q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 5, 2, 4)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((2, 1, 2, 5, 5)) < 0.7) | jnp.eye(5, dtype=bool)[None, None, None]
    got = flax_attention_fn()(q, k, v, mask=mask)
    flat = lambda x: x.reshape(6, *x.shape[2:])
    full_mask = jnp.broadcast_to(mask, (2, 3, 2, 5, 5))
    want = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=flat(full_mask))
    assert got.shape == q.shape
    assert_close(got, np.asarray(want.reshape(q.shape), np.float64), TOLERANCE[jnp.float32])
