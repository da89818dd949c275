"""jattn.reference against float64 NumPy oracles, and against jax.nn where jax.nn applies."""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from jattn import reference

import oracle
from cases import (
    FEATURES,
    GRAD_TOLERANCE,
    SHAPES,
    TOLERANCE,
    assert_close,
    make_inputs,
    make_options,
    oracle_attention,
    to_jax,
)


def _covering_pairs():
    """(shape, feature) pairs: each feature on two neighbouring shapes of SHAPES (one of them
    with T != S), so each shape meets a third of the features; the rest of the cross product
    runs under -m slow."""
    shapes = list(SHAPES)
    for i, feature in enumerate(FEATURES):
        covered = {shapes[i % len(shapes)], shapes[(i + 1) % len(shapes)]}
        for shape_name in shapes:
            marks = () if shape_name in covered else pytest.mark.slow
            yield pytest.param(shape_name, feature, marks=marks, id=f"{shape_name}-{feature}")


@pytest.mark.parametrize(("shape_name", "feature"), list(_covering_pairs()))
def test_attention_matches_oracle_with_gradients(rng, shape_name, feature):
    shape = SHAPES[shape_name]
    q, k, v = make_inputs(rng, shape)
    options = to_jax(make_options(rng, feature, shape))
    bias = options.pop("bias", None)
    want_out, want_lse, cache, visible = oracle_attention(q, k, v, dict(options, bias=bias))

    def run(q, k, v, bias):
        return reference.dot_product_attention(q, k, v, bias, return_residual=True, **options)

    (out, lse), vjp = jax.vjp(run, q, k, v, bias)
    assert_close(out, want_out, TOLERANCE[jnp.float32], "out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    assert_close(lse[finite], want_lse[finite], TOLERANCE[jnp.float32], "lse")

    d_out = rng.standard_normal(out.shape)
    d_lse = np.where(finite, rng.standard_normal(lse.shape), 0.0)
    grads = vjp((jnp.asarray(d_out, jnp.float32), jnp.asarray(d_lse, jnp.float32)))
    want = oracle.attention_vjp(cache, d_out, d_lse, None if bias is None else bias.shape)
    for name, got, expected in zip(("dq", "dk", "dv", "dbias"), grads, want, strict=True):
        if expected is None:
            assert got is None
            continue
        assert np.isfinite(np.asarray(got)).all(), name
        assert_close(got, expected, GRAD_TOLERANCE[jnp.float32], name)

    rows_without_keys = ~visible.any(-1).transpose(0, 2, 1)  # [B, T, N]
    assert np.all(np.asarray(out)[rows_without_keys] == 0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("feature", ["plain", "causal_window_bias_softcap", "lengths_empty"])
def test_attention_low_precision_inputs(rng, dtype, feature):
    shape = SHAPES["gqa4_t_lt_s"]
    q, k, v = make_inputs(rng, shape, dtype)
    options = to_jax(make_options(rng, feature, shape), dtype)
    want_out, _, _, _ = oracle_attention(q, k, v, options)
    bias = options.pop("bias", None)
    out = reference.dot_product_attention(q, k, v, bias, **options)
    assert out.dtype == dtype
    assert_close(out, want_out, TOLERANCE[dtype])


def test_fully_masked_rows_are_zero_with_zero_gradients(rng):
    q, k, v = make_inputs(rng, (1, 4, 6, 2, 2, 8))
    mask = np.ones((1, 1, 4, 6), bool)
    mask[..., 1, :] = False  # row 1 sees nothing

    def loss(q, k, v):
        out, lse = reference.dot_product_attention(q, k, v, mask=mask, return_residual=True)
        return jnp.sum(out**2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    (_, (out, lse)), (dq, dk, dv) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        q, k, v
    )
    assert np.all(np.asarray(out[:, 1]) == 0)
    assert np.all(np.isneginf(np.asarray(lse[:, 1])))
    assert np.all(np.asarray(dq[:, 1]) == 0)
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()


# --- against jax.nn.dot_product_attention, on every kind of call it accepts -------------------

JAX_NN_CASES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "window": dict(local_window_size=(3, 2)),
    "window_int_causal": dict(local_window_size=2, is_causal=True),
    "lengths": "lengths",
    "bias": "bias",
    "mask": "mask",
    "bias_mask_causal": "bias_mask_causal",
    "scale": dict(scale=0.21),
}


def _jax_nn_options(rng, name, shape):
    batch, q_len, kv_len, heads, _, _ = shape
    spec = JAX_NN_CASES[name]
    if isinstance(spec, dict):
        return spec
    if spec == "lengths":
        return dict(
            query_seq_lengths=jnp.asarray(rng.integers(1, q_len + 1, batch), jnp.int32),
            key_value_seq_lengths=jnp.asarray(rng.integers(1, kv_len + 1, batch), jnp.int32),
        )
    bias = jnp.asarray(rng.standard_normal((batch, heads, q_len, kv_len)), jnp.float32)
    mask = jnp.asarray(rng.random((1, heads, q_len, kv_len)) < 0.7)
    if spec == "bias":
        return dict(bias=bias)
    if spec == "mask":
        return dict(mask=mask)
    return dict(bias=bias, mask=mask, is_causal=True)


@pytest.mark.parametrize("case", JAX_NN_CASES)
@pytest.mark.parametrize("shape_name", ["mha_square", "gqa4_t_lt_s", "mqa8_t_gt_s"])
def test_attention_matches_jax_nn(rng, shape_name, case):
    shape = SHAPES[shape_name]
    q, k, v = make_inputs(rng, shape)
    options = _jax_nn_options(rng, case, shape)
    out, lse = reference.dot_product_attention(q, k, v, return_residual=True, **options)
    want_out, want_lse = jax.nn.dot_product_attention(
        q, k, v, return_residual=True, implementation="xla", **options
    )
    rows = np.isfinite(np.asarray(lse))  # jax.nn differs on rows that see no key
    assert_close(np.asarray(out)[rows], np.asarray(want_out)[rows], TOLERANCE[jnp.float32])
    assert_close(np.asarray(lse)[rows], np.asarray(want_lse)[rows], TOLERANCE[jnp.float32])

    weights = jnp.asarray(rng.standard_normal(out.shape) * rows[..., None], jnp.float32)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    ours = grad(lambda *a: reference.dot_product_attention(*a, **options))
    theirs = grad(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla", **options))
    for got, want in zip(ours, theirs, strict=True):
        assert_close(got, np.asarray(want, np.float64), GRAD_TOLERANCE[jnp.float32])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_attention_matches_jax_nn_low_precision(rng, dtype):
    q, k, v = make_inputs(rng, SHAPES["gqa4_t_lt_s"], dtype)
    out = reference.dot_product_attention(q, k, v, is_causal=True)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    # jax.nn rounds the probabilities to the input dtype before P.V; we keep them in float32.
    assert_close(out, np.asarray(want, np.float64), tuple(2 * t for t in TOLERANCE[dtype]))


# --- decode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 2, 16, 13), (2, 4, 4, 40, 1), (4, 8, 1, 24, 33)])
def test_decode_matches_oracle(rng, shape):
    batch, heads, kv_heads, dim, capacity = shape
    q = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), jnp.float32)
    lengths = rng.integers(0, capacity + 1, batch)
    lengths[0] = 0
    out, lse = reference.decode_attention(q, k, v, jnp.asarray(lengths), return_residual=True)
    want_out, want_lse = oracle.decode(q, k, v, lengths)
    assert_close(out, want_out, TOLERANCE[jnp.float32])
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    assert_close(np.asarray(lse)[finite], want_lse[finite], TOLERANCE[jnp.float32])


# --- TSSA -------------------------------------------------------------------------------------

TSSA_SHAPES = [(2, 9, 4, 8), (1, 17, 3, 5), (2, 1, 2, 16), (1, 33, 8, 12)]


def _tssa_inputs(rng, shape, dtype=jnp.float32):
    batch, q_len, heads, dim = shape
    w = jnp.asarray(rng.standard_normal(shape), dtype)
    temperature = jnp.asarray(rng.uniform(0.5, 2.0, heads), jnp.float32)
    denom_bias = jnp.asarray(0.1 * rng.standard_normal((heads, q_len + 3)), jnp.float32)
    return w, temperature, denom_bias


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", TSSA_SHAPES)
def test_tssa_matches_oracle(rng, shape, causal):
    w, temperature, denom_bias = _tssa_inputs(rng, shape)
    denom_bias = denom_bias if causal else None
    got = reference.token_statistics_attention(w, temperature, causal=causal, denom_bias=denom_bias)
    want = oracle.tssa(w, temperature, causal=causal, denom_bias=denom_bias)
    assert_close(got, want, (1e-5, 1e-5))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_tssa_low_precision(rng, dtype, causal):
    w, temperature, _ = _tssa_inputs(rng, (2, 9, 4, 8), dtype)
    got = reference.token_statistics_attention(w, temperature, causal=causal)
    assert got.dtype == dtype
    assert_close(
        got,
        oracle.tssa(np.asarray(w.astype(jnp.float32)), temperature, causal=causal),
        TOLERANCE[dtype],
    )


def _finite_difference_grad(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += eps
        minus[index] -= eps
        grad[index] = (f(plus) - f(minus)) / (2 * eps)
    return grad


@pytest.mark.parametrize("causal", [False, True])
def test_tssa_gradients_match_float64_finite_differences(rng, causal):
    shape = (1, 6, 3, 4)
    w, temperature, denom_bias = _tssa_inputs(rng, shape)
    denom_bias = denom_bias if causal else None
    cotangent = rng.standard_normal(shape)
    w64, t64 = np.asarray(w, np.float64), np.asarray(temperature, np.float64)
    b64 = None if denom_bias is None else np.asarray(denom_bias, np.float64)
    loss64 = lambda w_, t_, b_: np.sum(
        oracle.tssa(w_, t_, causal=causal, denom_bias=b_) * cotangent
    )

    def loss(w, t, b):
        y = reference.token_statistics_attention(w, t, causal=causal, denom_bias=b)
        return jnp.sum(y * cotangent)

    dw, dt, db = jax.grad(loss, argnums=(0, 1, 2))(w, temperature, denom_bias)
    assert_close(dw, _finite_difference_grad(lambda x: loss64(x, t64, b64), w64), (1e-4, 1e-3))
    assert_close(dt, _finite_difference_grad(lambda x: loss64(w64, x, b64), t64), (1e-4, 1e-3))
    if causal:
        assert_close(db, _finite_difference_grad(lambda x: loss64(w64, t64, x), b64), (1e-4, 1e-3))


def test_tssa_zero_column_has_finite_gradient(rng):
    w = np.asarray(rng.standard_normal((1, 5, 2, 4)), np.float32)
    w[:, :, 0, 1] = 0.0  # a coordinate that is zero on every token: the norm clamp is active
    grad = jax.grad(lambda x: jnp.sum(reference.token_statistics_attention(x, jnp.ones(2))))(
        jnp.asarray(w)
    )
    assert np.isfinite(np.asarray(grad)).all()


# --- segment softmax ----------------------------------------------------------------------------


def test_segment_softmax_matches_oracle_and_jraph(rng):
    num_edges, num_segments = 40, 9
    ids = rng.integers(0, num_segments - 1, num_edges)  # the last segment stays empty
    logits = rng.standard_normal((num_edges, 3)).astype(np.float32)
    got = reference.segment_softmax(jnp.asarray(logits), jnp.asarray(ids), num_segments)
    assert_close(got, oracle.segment_softmax(logits, ids, num_segments), (1e-6, 1e-6))
    theirs = jraph.segment_softmax(jnp.asarray(logits), jnp.asarray(ids), num_segments)
    assert_close(got, np.asarray(theirs, np.float64), (1e-6, 1e-6))


def test_segment_softmax_masked_entries_and_padding_ids(rng):
    logits = rng.standard_normal(6).astype(np.float32)
    logits[[0, 1]] = -np.inf  # segment 0 is all masked
    ids = np.array([0, 0, 1, 1, 1, 5])  # id 5 is out of range: a padding edge
    got = np.asarray(reference.segment_softmax(jnp.asarray(logits), jnp.asarray(ids), 3))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[[0, 1, 5]], 0.0)
    np.testing.assert_allclose(got[2:5].sum(), 1.0, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(reference.segment_softmax(x, jnp.asarray(ids), 3) ** 2))(
        jnp.asarray(logits)
    )
    assert np.isfinite(np.asarray(grad)).all()
