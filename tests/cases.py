"""Shapes, feature cases and tolerances shared by the attention tests."""

import jax
import jax.numpy as jnp
import numpy as np

import jattn

import oracle

# (B, T, S, N, K, H): odd lengths, T != S both ways, GQA ratios 1/2/4/8, head dims 16..256
# including ones that are not a multiple of 8.
SHAPES = {
    "mha_square": (2, 7, 7, 4, 4, 16),
    "gqa4_t_lt_s": (1, 13, 29, 8, 2, 40),
    "mqa8_t_gt_s": (2, 33, 17, 8, 1, 72),
    "gqa2_h20": (1, 16, 16, 6, 3, 20),
    "gqa2_h256": (1, 5, 9, 2, 1, 256),
    "one_query_h33": (2, 1, 31, 4, 2, 33),
}

FEATURES = (
    "plain",
    "causal",
    "causal_bottom_right",
    "causal_offset_per_batch",
    "window",
    "window_causal",
    "lengths",
    "lengths_empty",
    "segments",
    "soft_cap",
    "bias_full",
    "bias_broadcast",
    "bias_2d",
    "bias_per_query",
    "mask",
    "scale",
    "causal_window_bias_softcap",
    "segments_causal_lengths",
)

# (atol, rtol) for outputs in each input dtype, against a float64 oracle on the same inputs.
TOLERANCE = {
    jnp.float32: (2e-5, 2e-5),
    jnp.float16: (2e-3, 2e-3),
    jnp.bfloat16: (1.6e-2, 1.6e-2),
}
GRAD_TOLERANCE = {
    jnp.float32: (1e-4, 1e-4),
    jnp.float16: (1e-2, 1e-2),
    jnp.bfloat16: (6e-2, 6e-2),
}


def make_inputs(rng, shape, dtype=jnp.float32):
    batch, q_len, kv_len, heads, kv_heads, dim = shape
    q = rng.standard_normal((batch, q_len, heads, dim))
    k = rng.standard_normal((batch, kv_len, kv_heads, dim))
    v = rng.standard_normal((batch, kv_len, kv_heads, dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def make_options(rng, feature, shape):
    """kwargs for jattn.dot_product_attention (and the oracle) that exercise one feature."""
    batch, q_len, kv_len, heads, _, _ = shape
    lengths = lambda n, low: rng.integers(low, n + 1, size=batch).astype(np.int32)
    segments = lambda n: np.sort(rng.integers(0, 3, size=(batch, n)), axis=1).astype(np.int32)
    match feature:
        case "plain":
            return {}
        case "causal":
            return dict(is_causal=True)
        case "causal_bottom_right":
            return dict(is_causal=True, q_offset=kv_len - q_len)
        case "causal_offset_per_batch":
            return dict(is_causal=True, q_offset=rng.integers(-2, kv_len, size=batch))
        case "window":
            return dict(local_window_size=(3, 2))
        case "window_causal":
            return dict(is_causal=True, local_window_size=4, q_offset=kv_len - q_len)
        case "lengths":
            return dict(
                query_seq_lengths=lengths(q_len, 1), key_value_seq_lengths=lengths(kv_len, 1)
            )
        case "lengths_empty":  # batch 0 has no keys at all: every row fully masked
            kv = lengths(kv_len, 1)
            kv[0] = 0
            return dict(query_seq_lengths=lengths(q_len, 0), key_value_seq_lengths=kv)
        case "segments":  # ids drawn independently: some queries find no key of their id
            return dict(segment_ids=(segments(q_len), segments(kv_len)))
        case "soft_cap":
            return dict(logits_soft_cap=1.5)
        case "bias_full":
            return dict(bias=rng.standard_normal((batch, heads, q_len, kv_len)))
        case "bias_broadcast":
            return dict(bias=rng.standard_normal((1, heads, 1, kv_len)))
        case "bias_2d":
            return dict(bias=rng.standard_normal((q_len, kv_len)))
        case "bias_per_query":  # broadcast over keys: its gradient sums over S
            return dict(bias=rng.standard_normal((batch, 1, q_len, 1)))
        case "mask":
            mask = rng.random((batch, 1, q_len, kv_len)) < 0.6
            mask[0, 0, 0, :] = False  # one fully masked row
            return dict(mask=mask)
        case "scale":
            return dict(scale=0.37)
        case "causal_window_bias_softcap":
            return dict(
                is_causal=True,
                local_window_size=(5, 0),
                q_offset=kv_len - q_len,
                bias=rng.standard_normal((batch, 1, q_len, kv_len)),
                logits_soft_cap=2.0,
            )
        case "segments_causal_lengths":
            return dict(
                segment_ids=(segments(q_len), segments(kv_len)),
                is_causal=True,
                key_value_seq_lengths=lengths(kv_len, 1),
                q_offset=kv_len - q_len,
            )
    raise ValueError(feature)


def to_jax(options, dtype=jnp.float32):
    """numpy option values -> jax arrays (bias in the input dtype)."""
    out = {}
    for name, value in options.items():
        if name == "bias":
            value = jnp.asarray(value, dtype)
        elif name == "segment_ids":
            value = tuple(jnp.asarray(x) for x in value)
        elif isinstance(value, np.ndarray):
            value = jnp.asarray(value)
        out[name] = value
    return out


def oracle_attention(q, k, v, options):
    """The float64 oracle on the (already rounded) inputs: out, lse, cache, visibility."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    options = {
        name: tuple(np.asarray(x) for x in value)
        if name == "segment_ids"
        else value
        if isinstance(value, int | float | tuple)
        else np.asarray(value)
        for name, value in options.items()
        if value is not None
    }
    batch, q_len, heads, _ = q.shape
    window = options.get("local_window_size")
    if isinstance(window, int):
        window = (window, window)
    visible = oracle.attention_visibility(
        batch,
        heads,
        q_len,
        k.shape[1],
        mask=options.get("mask"),
        is_causal=options.get("is_causal", False),
        q_offset=options.get("q_offset"),
        window=window,
        q_lengths=options.get("query_seq_lengths"),
        kv_lengths=options.get("key_value_seq_lengths"),
        segment_ids=options.get("segment_ids"),
    )
    bias = options.get("bias")
    if bias is not None:
        bias = np.asarray(jnp.asarray(bias, jnp.float32), np.float64)  # as rounded by the dtype
    out, lse, cache = oracle.attention(
        q,
        k,
        v,
        bias,
        scale=options.get("scale"),
        soft_cap=options.get("logits_soft_cap"),
        visible=visible,
    )
    return out, lse, cache, visible


def assert_close(actual, expected, tol, what=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    atol, rtol = tol
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


def lse_tolerance(dtype):
    """(atol, rtol) for an lse returned in the input dtype, as jax.nn returns it: the dtype's
    output tolerance, absolute plus relative to |lse|; bfloat16's rounding alone moves an lse
    in [8, 16) by up to 0.031, so a fixed absolute tolerance fails at large logits."""
    return TOLERANCE[dtype]


def check_against_oracle(
    rng, shape, options, dtype, implementation, config=None, *, gradients: bool = True
):
    """One dot_product_attention call against the float64 oracle: output, lse (-inf exactly
    where the oracle's is), and dq/dk/dv/dbias under a random output and lse cotangent
    (gradients=False: the forward alone, for a config that changes only the forward kernel)."""
    q, k, v = make_inputs(rng, shape, dtype)
    options = to_jax(options, dtype)
    want_out, want_lse, cache, _ = oracle_attention(q, k, v, options)
    bias = options.pop("bias", None)

    def run(q, k, v, bias):
        return jattn.dot_product_attention(
            q,
            k,
            v,
            bias,
            return_residual=True,
            implementation=implementation,
            config=config,
            **options,
        )

    (out, lse), vjp = jax.vjp(run, q, k, v, bias)
    assert out.dtype == dtype and lse.dtype == dtype  # the lse in the input dtype, as jax.nn
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert_close(out, want_out, TOLERANCE[dtype], "out")
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    assert_close(np.asarray(lse, np.float32)[finite], want_lse[finite], lse_tolerance(dtype), "lse")
    if not gradients:
        return
    d_out = rng.standard_normal(out.shape)
    d_lse = np.where(finite, rng.standard_normal(lse.shape), 0.0)
    grads = vjp((jnp.asarray(d_out, dtype), jnp.asarray(d_lse, dtype)))
    d_out = np.asarray(jnp.asarray(d_out, dtype).astype(jnp.float32), np.float64)
    d_lse = np.asarray(jnp.asarray(d_lse, dtype).astype(jnp.float32), np.float64)
    want = oracle.attention_vjp(cache, d_out, d_lse, None if bias is None else bias.shape)
    for name, got, expected in zip(("dq", "dk", "dv", "dbias"), grads, want, strict=True):
        if expected is not None:
            assert got.dtype == dtype and got.shape == expected.shape, name
            assert np.isfinite(np.asarray(got, np.float32)).all(), name
            scale = max(1.0, np.abs(expected).max())  # low precision: relative to the largest
            assert_close(got, expected, tuple(t * scale for t in GRAD_TOLERANCE[dtype]), name)


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs in its equations' params (kernel bodies)."""
    from jax._src import core

    for eqn in jaxpr.eqns:
        yield eqn
        for sub in core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def run_state_literals(jaxpr) -> list:
    """The operands of every run_state (a Mosaic GPU wgmma into register accumulators) in a
    traced jaxpr that take a literal: JAX 0.11's lowering fails on them ("Shaped arrays must be
    represented by ir.Values, got: TypedInt(0)"), JAX 0.10's does not. Asserts some were traced."""
    from jax._src import core

    run_states = [e for e in _eqns(jaxpr) if e.primitive.name == "run_state"]
    assert run_states, "no wgmma was traced"
    return [e.invars for e in run_states if any(isinstance(x, core.Literal) for x in e.invars)]


def kernel_64bit_values(jaxpr) -> list:
    """The equations inside the Pallas kernels of a traced jaxpr that make a 64-bit value
    (int64, uint64, float64): under jax_enable_x64 the kernels' index arithmetic must stay
    32-bit (Mosaic GPU and Triton index in int32), and a float64 operand (a bias) is streamed
    as float32. Asserts a kernel was traced."""
    from jax._src import core

    kernels = [e for e in _eqns(jaxpr) if e.primitive.name in ("pallas_call", "mpmd_map")]
    assert kernels, "no kernel was traced"
    wide = (np.dtype(np.int64), np.dtype(np.uint64), np.dtype(np.float64))
    return [
        e
        for kernel in kernels
        for sub in core.jaxprs_in_params(kernel.params)
        for e in _eqns(sub)
        if any(getattr(v.aval, "dtype", None) in wide for v in e.outvars)
    ]
