"""`jax_enable_x64` and every autodiff mode: the kernels trace with x64 on (their index
arithmetic is int32 by construction), float64 inputs run or are declined with the reason, and
forward mode, second order and the lse's own gradient are exact where they are served."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import reference

from cases import SHAPES, check_against_oracle, make_inputs, make_options

# 16 x 16 tiles: several tiles, padded last ones, skipped hidden ones, at interpret-mode sizes.
SMALL_TRITON = jattn.TritonConfig(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16)


# --- jax_enable_x64 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "implementation, feature",
    [
        ("triton", "causal_window_bias_softcap"),
        ("triton", "segments_causal_lengths"),
        ("xla_chunked", "causal_offset_per_batch"),
    ],
)
def test_kernels_run_with_x64_enabled(rng, implementation, feature):
    """Before: 'lax.div requires arguments to have the same dtypes, got int32, int64' inside the
    Triton kernel's block arithmetic. Output, lse and every gradient against the float64 oracle."""
    shape = SHAPES["gqa4_t_lt_s"]
    config = SMALL_TRITON if implementation == "triton" else jattn.ChunkedConfig(block_k=8)
    with jax.enable_x64(True):
        options = make_options(rng, feature, shape)
        check_against_oracle(rng, shape, options, jnp.float32, implementation, config)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_kernel_runs_with_x64_enabled(rng, paged):
    batch, heads, kv_heads, dim, capacity = 2, 4, 2, 16, 32
    q = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), jnp.float32)
    lengths = np.array([5, 30])
    want = reference.decode_attention(q, k, v, jnp.asarray(lengths, jnp.int32))
    with jax.enable_x64(True):
        if paged:  # pages of 16: sequence b owns pages 2b, 2b + 1
            table = jnp.arange(2 * batch).reshape(batch, 2)
            pool_k, pool_v = (x.reshape(2 * batch, 16, kv_heads, dim) for x in (k, v))
            got = jattn.decode_attention(
                q, pool_k, pool_v, lengths, page_table=table, implementation="triton"
            )
        else:
            got = jattn.decode_attention(q, k, v, lengths, implementation="triton")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_float64_inputs_run_on_xla_paths_and_are_declined_by_the_kernels(rng):
    shape = (1, 9, 11, 4, 2, 16)
    with jax.enable_x64(True):
        q, k, v = (x.astype(jnp.float64) for x in make_inputs(rng, shape))
        want = reference.dot_product_attention(q, k, v, is_causal=True)
        assert want.dtype == jnp.float64
        for implementation in ("xla", "xla_chunked", None):
            got = jattn.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12, rtol=1e-12)
        with pytest.raises(NotImplementedError, match="triton: .*not float64"):
            jattn.dot_product_attention(q, k, v, implementation="triton")
        with pytest.raises(NotImplementedError, match="mosaic: .*float16/bfloat16"):
            jattn.dot_product_attention(q, k, v, implementation="mosaic")
        # decode: the kernel declines float64 (its float32 accumulators); auto serves it on xla
        q1, lengths = q[:, 0], np.array([7])
        with pytest.raises(NotImplementedError, match="not float64"):
            jattn.decode_attention(q1, k, v, lengths, implementation="triton")
        got = jattn.decode_attention(q1, k, v, lengths)
        want = reference.decode_attention(q1, k, v, jnp.asarray(lengths))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12, rtol=1e-12)
