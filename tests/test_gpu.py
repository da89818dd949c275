"""GPU-only checks at real sizes: cuDNN through the dispatcher, auto selection, xla_chunked.

Run on the device with `pytest -m gpu`; skipped elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import attention

pytestmark = pytest.mark.gpu

B, T, N, K, H = 2, 512, 8, 2, 128


def _inputs(dtype, seed=0, q_len=T, kv_len=T, head_dim=H):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, q_len, N, head_dim), dtype)
    k = jax.random.normal(keys[1], (B, kv_len, K, head_dim), dtype)
    v = jax.random.normal(keys[2], (B, kv_len, K, head_dim), dtype)
    return q, k, v


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


CUDNN_CASES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "lengths_with_empty_sequence": dict(
        query_seq_lengths=jnp.array([T, 300], jnp.int32),
        key_value_seq_lengths=jnp.array([0, 77], jnp.int32),
    ),
    "window_causal": dict(is_causal=True, local_window_size=(64, 0)),
    "bias": dict(bias=jax.random.normal(jax.random.key(7), (1, N, T, T))),
    "mask_with_empty_row": dict(
        mask=jnp.ones((1, 1, T, T), bool).at[:, :, 3, :].set(False), is_causal=True
    ),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case", CUDNN_CASES)
def test_cudnn_matches_reference_with_gradients(case, dtype):
    """Output, float32 lse and the gradients of both (cuDNN's backward drops the lse's
    cotangent; jattn.cudnn adds it back), against XLA in float32."""
    q, k, v = _inputs(dtype)
    options = dict(CUDNN_CASES[case])
    if "bias" in options:
        options["bias"] = options["bias"].astype(dtype)
    keys = jax.random.split(jax.random.key(3))
    d_out = jax.random.normal(keys[0], q.shape, dtype)
    d_lse = jax.random.normal(keys[1], q.shape[:-1], jnp.float32)
    lse_in_loss = "bias" not in options  # its P d_lse is not served: see below

    def run(implementation, q, k, v):
        def loss(q, k, v):
            args = attention.check_attention_args(q, k, v, **options)
            out, lse = attention._run(args, implementation, None)  # the float32 lse
            seen = jnp.isfinite(lse)
            lse_term = jnp.sum(jnp.where(seen, lse, 0) * d_lse) if lse_in_loss else 0.0
            return jnp.sum(out.astype(jnp.float32) * d_out) + lse_term, (out, lse)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, (out, lse)), grads = run("cudnn", q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, (want, want_lse)), want_grads = run("xla", *f32)
    assert _relative_error(out, want) < 1e-2
    assert lse.dtype == jnp.float32
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(np.asarray(want_lse))
    # jax.nn's own lse comes rounded to the input dtype: up to 0.008 off here, 0.03 at 4k
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], atol=2e-3)
    rows_without_keys = ~finite
    assert np.all(np.asarray(out, np.float32)[rows_without_keys] == 0)
    for got, expected in zip(grads, want_grads, strict=True):
        assert np.isfinite(np.asarray(got, np.float32)).all()
        assert _relative_error(got, expected) < 2e-2


def test_cudnn_inference_forward_and_the_lse_gradient_with_bias():
    """Without return_residual cuDNN runs its inference forward: the same output. The lse's
    gradient with a bias is a NotImplementedError naming the ones that serve it."""
    q, k, v = _inputs(jnp.bfloat16)
    out = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    with_lse, _ = jattn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn", return_residual=True
    )
    assert _relative_error(out, with_lse) < 1e-3
    bias = jnp.zeros((1, N, T, T), jnp.bfloat16)

    def lse_sum(q):
        _, lse = jattn.dot_product_attention(
            q, k, v, bias, implementation="cudnn", return_residual=True
        )
        return jnp.sum(lse.astype(jnp.float32))

    with pytest.raises(NotImplementedError, match="gradient of the lse with a bias"):
        jax.grad(lse_sum)(q)


def test_auto_selection_prefers_cudnn_and_falls_through_when_it_declines():
    assert jattn.auto_order()[:3] == ("cudnn", "mosaic", "triton")  # on Hopper
    q, k, v = _inputs(jnp.bfloat16)
    auto = jattn.dot_product_attention(q, k, v, is_causal=True)
    cudnn = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(cudnn, np.float32))
    # soft cap is not cuDNN's: auto serves it from the Mosaic kernel; float32 from Triton.
    capped = jattn.dot_product_attention(q, k, v, is_causal=True, logits_soft_cap=20.0)
    want = jattn.dot_product_attention(
        q, k, v, is_causal=True, logits_soft_cap=20.0, implementation="xla"
    )
    assert _relative_error(capped, want) < 1e-2
    q32, k32, v32 = _inputs(jnp.float32)
    out32 = jattn.dot_product_attention(q32, k32, v32)
    assert _relative_error(out32, jattn.reference.dot_product_attention(q32, k32, v32)) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_chunked_at_long_length_matches_reference(dtype):
    q, k, v = _inputs(dtype, q_len=4096, kv_len=4096, head_dim=64)
    options = dict(is_causal=True, q_offset=0, local_window_size=(1024, 0))
    got = jax.jit(
        lambda q, k, v: jattn.dot_product_attention(
            q, k, v, implementation="xla_chunked", **options
        )
    )(q, k, v)
    want = jattn.reference.dot_product_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), **options
    )
    assert _relative_error(got, want) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)
