"""jattn.decode_attention and jattn.token_statistics_attention: public API and checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn

import oracle
from cases import TOLERANCE, assert_close


def _decode_inputs(rng, batch=3, heads=8, kv_heads=2, dim=16, capacity=11, dtype=jnp.float32):
    q = jnp.asarray(rng.standard_normal((batch, heads, dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_decode_matches_oracle(rng, dtype):
    q, k, v = _decode_inputs(rng, dtype=dtype)
    lengths = np.array([0, 5, 11])
    out, lse = jattn.decode_attention(q, k, v, lengths, return_residual=True)
    want_out, want_lse = oracle.decode(
        *(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)), lengths
    )
    assert out.dtype == dtype
    assert_close(out, want_out, TOLERANCE[dtype])
    assert np.isneginf(np.asarray(lse[0])).all()
    assert_close(lse[1:], want_lse[1:], TOLERANCE[jnp.float32])


def test_decode_equals_attention_with_bottom_right_causal(rng):
    q, k, v = _decode_inputs(rng)
    lengths = jnp.array([3, 7, 11])
    got = jax.jit(jattn.decode_attention)(q, k, v, lengths)
    want = jattn.dot_product_attention(q[:, None], k, v, is_causal=True, q_offset=lengths - 1)
    assert_close(got, np.asarray(want[:, 0], np.float64), TOLERANCE[jnp.float32])


def test_decode_partial_results_merge_by_lse(rng):
    """Two halves of a cache, merged with their lse, equal the whole: what offloading relies on."""
    q, k, v = _decode_inputs(rng, capacity=12)
    lengths = jnp.array([12, 12, 12])
    half = jnp.array([6, 6, 6])
    out, _ = jattn.decode_attention(q, k, v, lengths, return_residual=True)
    out_1, lse_1 = jattn.decode_attention(q, k[:, :6], v[:, :6], half, return_residual=True)
    out_2, lse_2 = jattn.decode_attention(q, k[:, 6:], v[:, 6:], half, return_residual=True)
    lse = jnp.logaddexp(lse_1, lse_2)
    merged = jnp.exp(lse_1 - lse)[..., None] * out_1 + jnp.exp(lse_2 - lse)[..., None] * out_2
    assert_close(merged, np.asarray(out, np.float64), TOLERANCE[jnp.float32])


DECODE_BAD = {
    "query_rank": (dict(q=jnp.ones((3, 1, 8, 16))), r"query \[B, N, H\].*query \(3, 1, 8, 16\)"),
    "cache_mismatch": (dict(v=jnp.ones((3, 11, 2, 8))), "one shape"),
    "heads": (dict(q=jnp.ones((3, 5, 16))), "multiple of kv heads"),
    "lengths_shape": (dict(lengths=jnp.ones((2,), jnp.int32)), r"\[B\] = \(3,\)"),
    "negative": (dict(lengths=np.array([0, -1, 4])), r"lengths must lie in \[0, S = 11\]"),
    "over_capacity": (dict(lengths=np.array([0, 12, 4])), r"\[0, 12, 4\]"),
    "implementation": (dict(implementation="paged"), "Unknown decode implementation"),
}


@pytest.mark.parametrize("case", DECODE_BAD)
def test_decode_bad_input(rng, case):
    q, k, v = _decode_inputs(rng)
    call = dict(q=q, k=k, v=v, lengths=np.array([1, 2, 3]))
    overrides, message = DECODE_BAD[case]
    call.update(overrides)
    implementation = call.pop("implementation", None)
    with pytest.raises(ValueError, match=message):
        jattn.decode_attention(
            call["q"], call["k"], call["v"], call["lengths"], implementation=implementation
        )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tssa_public_api_matches_oracle(rng, causal, dtype):
    w = jnp.asarray(rng.standard_normal((2, 11, 4, 8)), dtype)
    temperature = jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)
    denom_bias = jnp.asarray(0.1 * rng.standard_normal((4, 16)), jnp.float32) if causal else None
    got = jax.jit(
        lambda w: jattn.token_statistics_attention(
            w, temperature, causal=causal, denom_bias=denom_bias
        )
    )(w)
    want = oracle.tssa(
        np.asarray(w.astype(jnp.float32)), temperature, causal=causal, denom_bias=denom_bias
    )
    assert got.dtype == dtype
    assert_close(got, want, TOLERANCE[dtype] if dtype != jnp.float32 else (1e-5, 1e-5))


def test_causal_tssa_is_not_a_masked_copy_and_ignores_later_tokens(rng):
    """Causal output at the last token differs from non-causal there (different Pi history)."""
    w = jnp.asarray(rng.standard_normal((1, 9, 3, 4)), jnp.float32)
    t = jnp.ones(3)
    causal = jattn.token_statistics_attention(w, t, causal=True)
    full = jattn.token_statistics_attention(w, t)
    assert not np.allclose(np.asarray(causal[:, -1]), np.asarray(full[:, -1]), atol=1e-3)
    # ...while the causal prefix never depends on later tokens.
    prefix = jattn.token_statistics_attention(w[:, :5], t, causal=True)
    assert_close(causal[:, :5], np.asarray(prefix, np.float64), (1e-6, 1e-6))


TSSA_BAD = {
    "rank": (dict(w=jnp.ones((2, 11, 32))), r"w must be a float array \[B, T, N, H\]"),
    "int": (dict(w=jnp.ones((2, 11, 4, 8), jnp.int32)), "float array"),
    "temperature": (dict(temperature=jnp.ones((4, 1))), r"temperature must have shape \[N\]"),
    "bias_not_causal": (dict(denom_bias=jnp.zeros((4, 16)), causal=False), "causal=True"),
    "bias_short": (dict(denom_bias=jnp.zeros((4, 10)), causal=True), "longer than denom_bias"),
    "bias_heads": (dict(denom_bias=jnp.zeros((3, 16)), causal=True), r"\[N, L\] = \(4, L\)"),
    "implementation": (dict(implementation="mosaic"), "Unknown TSSA implementation"),
}


@pytest.mark.parametrize("case", TSSA_BAD)
def test_tssa_bad_input(case):
    call = dict(w=jnp.ones((2, 11, 4, 8)), temperature=jnp.ones(4))
    overrides, message = TSSA_BAD[case]
    call.update(overrides)
    with pytest.raises(ValueError, match=message):
        jattn.token_statistics_attention(call.pop("w"), call.pop("temperature"), **call)
