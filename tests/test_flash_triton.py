"""The Triton flash kernel (`implementation="triton"`): Pallas interpret mode on CPU, compiled
on a GPU (`-m gpu`), against the float64 oracle and the reference, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import reference
from pallas_kernels import flash_triton

from cases import (
    FEATURES,
    SHAPES,
    TOLERANCE,
    assert_close,
    check_against_oracle,
    lse_tolerance,
    make_inputs,
    make_options,
    to_jax,
)

# 16 x 16 tiles (the smallest Triton allows), so small shapes still run several tiles, pad the
# last query and key tiles, and skip hidden ones.
SMALL = jattn.TritonConfig(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16)

# What users combine, beyond the single features of cases.FEATURES.
COMBINED = {
    "causal_gqa_window": (
        "gqa4_t_lt_s",
        lambda rng, shape: dict(is_causal=True, local_window_size=(6, 0), q_offset=16),
    ),
    "lengths_gqa": (
        "mqa8_t_gt_s",
        lambda rng, shape: dict(
            query_seq_lengths=rng.integers(0, shape[1] + 1, shape[0]).astype(np.int32),
            key_value_seq_lengths=rng.integers(1, shape[2] + 1, shape[0]).astype(np.int32),
        ),
    ),
    "softcap_causal_bottom_right": (
        "gqa4_t_lt_s",
        lambda rng, shape: dict(logits_soft_cap=1.0, is_causal=True, q_offset=shape[2] - shape[1]),
    ),
}


def _check_against_oracle(rng, shape, options, dtype, config=SMALL):
    check_against_oracle(rng, shape, options, dtype, "triton", config)


@pytest.mark.parametrize("feature", FEATURES)
def test_every_feature_matches_oracle_float32(rng, feature):
    shape = SHAPES["gqa4_t_lt_s"] if feature != "plain" else SHAPES["mqa8_t_gt_s"]
    _check_against_oracle(rng, shape, make_options(rng, feature, shape), jnp.float32)


@pytest.mark.parametrize("combination", COMBINED)
def test_combined_features_match_oracle(rng, combination):
    shape_name, options = COMBINED[combination]
    shape = SHAPES[shape_name]
    _check_against_oracle(rng, shape, options(rng, shape), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("feature", ["causal_window_bias_softcap", "segments_causal_lengths"])
def test_half_precision_matches_oracle(rng, feature, dtype):
    shape = SHAPES["gqa4_t_lt_s"]
    _check_against_oracle(rng, shape, make_options(rng, feature, shape), dtype)


@pytest.mark.parametrize("shape_name", [s for s in SHAPES if s != "gqa4_t_lt_s"])
def test_shapes_and_head_dims_match_oracle(rng, shape_name):
    shape = SHAPES[shape_name]
    _check_against_oracle(
        rng, shape, {"is_causal": True, "q_offset": shape[2] - shape[1]}, jnp.float32
    )


def test_default_config_runs_and_matches_reference(rng):
    q, k, v = make_inputs(rng, (1, 70, 70, 2, 1, 64))
    got = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="triton")
    want = reference.dot_product_attention(q, k, v, is_causal=True)
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


def test_backward_is_deterministic(rng):
    q, k, v = make_inputs(rng, SHAPES["gqa4_t_lt_s"])
    bias = jnp.asarray(rng.standard_normal((1, 8, 13, 29)), jnp.float32)

    def loss(q, k, v, bias):
        out = jattn.dot_product_attention(
            q, k, v, bias, is_causal=True, implementation="triton", config=SMALL
        )
        return jnp.sum(jnp.sin(out))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    for first, second in zip(grad(q, k, v, bias), grad(q, k, v, bias), strict=True):
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_hidden_key_tiles_are_skipped_not_masked(rng):
    """NaN in keys and values that a causal window hides tile-wide: a tile that were computed
    and masked would still multiply 0 * NaN into the output; a skipped tile never reads them."""
    q, k, v = make_inputs(rng, (1, 32, 64, 2, 2, 16))
    # causal with q_offset 0 and window left 8: queries 0..31 see keys 0..31 only, and query
    # tile [16, 32) sees keys >= 8. Keys 32..63 are two whole tiles nobody sees.
    k, v = (x.at[:, 32:].set(jnp.nan) for x in (k, v))

    def loss(q, k, v):
        out = jattn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(8, 0), implementation="triton", config=SMALL
        )
        return jnp.sum(out), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert np.isfinite(np.asarray(grads[0])).all()
    want = reference.dot_product_attention(
        q, k[:, :32], v[:, :32], is_causal=True, local_window_size=(8, 0)
    )
    assert_close(out, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


def _kernel_names(jaxpr) -> list[str]:
    """Names of the pallas_calls in a jaxpr, nested jaxprs included."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            name = eqn.params.get("name") or eqn.params.get("name_and_src_info")
            names.append(str(name).split()[0])  # JAX versions differ in the param's name
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                names += _kernel_names(inner)
    return names


def test_dbias_kernel_runs_only_when_bias_is_differentiated(rng):
    q, k, v = make_inputs(rng, SHAPES["gqa4_t_lt_s"])
    bias = jnp.asarray(rng.standard_normal((1, 8, 13, 29)), jnp.float32)

    def loss(q, k, v, bias):
        return jnp.sum(jattn.dot_product_attention(q, k, v, bias, implementation="triton"))

    def kernels(argnums):
        return set(_kernel_names(jax.make_jaxpr(jax.grad(loss, argnums))(q, k, v, bias).jaxpr))

    assert kernels((0, 1, 2)) == {"jattn_flash_forward", "jattn_flash_dq", "jattn_flash_dkdv"}
    assert "jattn_flash_dbias" in kernels((0, 3))


def test_config_validation():
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        jattn.TritonConfig(block_q=48)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        jattn.TritonConfig(block_k=8)
    with pytest.raises(ValueError, match="num_warps"):
        jattn.TritonConfig(num_warps=3)
    with pytest.raises(ValueError, match="bwd_num_stages"):
        jattn.TritonConfig(bwd_num_stages=0)


@pytest.mark.parametrize("head_dim", [16, 64, 72, 128, 256])
def test_default_config_by_head_dim_and_dtype(head_dim):
    half = flash_triton.default_config(head_dim, jnp.bfloat16)
    wide = flash_triton.default_config(head_dim, jnp.float32)
    assert isinstance(half, jattn.TritonConfig) and isinstance(wide, jattn.TritonConfig)
    # float32 tiles are no larger than half-precision ones (twice the bytes per element)
    assert wide.block_q * wide.block_k <= half.block_q * half.block_k
    assert wide.bwd_block_q * wide.bwd_block_k <= half.bwd_block_q * half.bwd_block_k
    # the widest head dims get the smallest forward tiles (shared memory holds H-wide rows)
    if head_dim > 128:
        assert half.block_q * half.block_k <= 64 * 64


def test_declines_float64_and_a_foreign_config(rng):
    jax.config.update("jax_enable_x64", True)
    try:
        q = jnp.ones((1, 4, 2, 8), jnp.float64)
        with pytest.raises(NotImplementedError, match="triton: the Triton kernel serves"):
            jattn.dot_product_attention(q, q, q, implementation="triton")
    finally:
        jax.config.update("jax_enable_x64", False)
    q, k, v = make_inputs(rng, SHAPES["mha_square"])
    with pytest.raises(ValueError, match="'triton' takes a TritonConfig, got a ChunkedConfig"):
        jattn.dot_product_attention(q, k, v, implementation="triton", config=jattn.ChunkedConfig())


def test_drop_in_for_jax_nn_with_mask_and_unbatched_inputs(rng):
    q, k, v = make_inputs(rng, SHAPES["gqa2_h20"])
    mask = jnp.asarray(rng.random((1, 1, 16, 16)) < 0.8) | jnp.eye(16, dtype=bool)[None, None]
    for args in ((q, k, v), (q[0], k[0], v[0])):
        want = jax.nn.dot_product_attention(*args, mask=mask, is_causal=True)
        got = jattn.dot_product_attention(
            *args, mask=mask, is_causal=True, implementation="triton", config=SMALL
        )
        assert got.shape == want.shape
        assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


# --- on the GPU, compiled, at real sizes ----------------------------------------------------------

GPU_SHAPE = (2, 523, 1031, 8, 2, 128)  # odd T and S, T != S, GQA 4
GPU_FEATURES = [f for f in FEATURES if f != "plain"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("feature", ["plain", *GPU_FEATURES])
def test_gpu_every_feature_matches_reference(rng, feature, dtype):
    """Compiled kernel vs the float32 reference on the same rounded inputs, fwd and grads."""
    q, k, v = make_inputs(rng, GPU_SHAPE, dtype)
    options = to_jax(make_options(rng, feature, GPU_SHAPE), dtype)
    bias = options.pop("bias", None)
    d_out = jnp.asarray(rng.standard_normal(q.shape), dtype)

    def grads(implementation, inputs):
        def run(q, k, v, bias):
            return jattn.dot_product_attention(
                q, k, v, bias, return_residual=True, implementation=implementation, **options
            )

        (out, lse), vjp = jax.vjp(run, *inputs)
        return out, lse, vjp((d_out.astype(out.dtype), jnp.zeros_like(lse)))

    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    out, lse, got = jax.jit(lambda *a: grads("triton", a))(q, k, v, bias)
    want_out, want_lse, want = jax.jit(lambda *a: grads("xla", a))(
        f32(q), f32(k), f32(v), f32(bias)
    )
    atol, rtol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), want_out, atol=atol * 2, rtol=rtol)
    assert lse.dtype == dtype  # the lse in the input dtype, as jax.nn returns it
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    want_lse = np.asarray(want_lse, np.float64)
    finite = np.isfinite(want_lse)
    lse = np.asarray(lse, np.float32)
    assert_close(lse[finite], want_lse[finite], lse_tolerance(dtype), "lse")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want, strict=True):
        if w is None:
            continue
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), name
        # relative to at least 1: a bias broadcast over keys has dbias ~ 0 (rows of P sum to 1)
        error = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1.0)
        limit = 3e-2 if dtype != jnp.float32 else 1e-4
        if name == "dbias" and bias.shape[-1] == 1 and dtype == jnp.bfloat16:
            # exactly 0 in exact arithmetic: what is left is delta = rowsum(dO * O) taken from
            # the bf16-rounded output, summed over S and N (measured 0.12 on an H100)
            limit = 0.25
        assert error < limit, (name, error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [33, 64, 96, 256])
def test_gpu_head_dims_with_default_configs(rng, head_dim, dtype):
    shape = (2, 700, 900, 4, 2, head_dim)
    q, k, v = make_inputs(rng, shape, dtype)
    d_out = jnp.asarray(rng.standard_normal(q.shape), dtype)

    def grads(implementation, q, k, v):
        def run(q, k, v):
            return jattn.dot_product_attention(
                q, k, v, is_causal=True, q_offset=200, implementation=implementation
            )

        out, vjp = jax.vjp(run, q, k, v)
        return out, vjp(d_out.astype(out.dtype))

    out, got = jax.jit(lambda *a: grads("triton", *a))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want_out, want = jax.jit(lambda *a: grads("xla", *a))(*f32)
    limit = 1e-4 if dtype == jnp.float32 else 3e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, *got), (want_out, *want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        error = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1.0)
        assert error < limit, (name, error)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(rng):
    q, k, v = make_inputs(rng, (2, 1024, 1024, 16, 4, 128), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(
        jattn.dot_product_attention(q, k, v, is_causal=True, implementation="triton").astype(
            jnp.float32
        )
        ** 2
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for first, second in zip(grad(q, k, v), grad(q, k, v), strict=True):
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_kernel_clamps_key_lengths_past_s(rng):
    """Called directly (as the Mosaic backward does), a key length past S means S: the zero
    padding between S and the block edge stays hidden (S = 20, length 33 gave a 0.19 error)."""
    q, k, v = make_inputs(rng, (1, 1, 20, 1, 1, 16))
    options = dict(
        scale=0.25,
        is_causal=False,
        q_offset=None,
        query_seq_lengths=jnp.array([5]),
        local_window_size=None,
        segment_ids=None,
        logits_soft_cap=None,
    )
    out, lse = flash_triton.flash_attention(
        q, k, v, None, None, key_value_seq_lengths=jnp.array([33]), **options
    )
    want_out, want_lse = jattn.reference.dot_product_attention(
        q, k, v, scale=0.25, return_residual=True
    )
    assert_close(out, np.asarray(want_out, np.float64), TOLERANCE[jnp.float32])
    assert_close(lse, np.asarray(want_lse, np.float64), TOLERANCE[jnp.float32])
