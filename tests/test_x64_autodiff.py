"""`jax_enable_x64` and every autodiff mode: the kernels trace with x64 on (their index
arithmetic is int32 by construction), float64 inputs run or are declined with the reason, and
forward mode, second order and the lse's own gradient are exact where they are served."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import reference

import oracle
from cases import (
    GRAD_TOLERANCE,
    SHAPES,
    TOLERANCE,
    check_against_oracle,
    make_inputs,
    make_options,
    oracle_attention,
)

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
        for implementation in ("xla", "xla_chunked"):
            got = jattn.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12, rtol=1e-12)
        with pytest.raises(NotImplementedError, match="triton: .*not float64"):
            jattn.dot_product_attention(q, k, v, implementation="triton")
        # mosaic serves float16/bfloat16 only (also tests/test_flash_mosaic.py's
        # test_declines_what_it_does_not_serve)
        with pytest.raises(NotImplementedError, match="mosaic: .*float64"):
            jattn.dot_product_attention(q, k, v, implementation="mosaic")
        # decode: the kernel declines float64 (its float32 accumulators); auto serves it on xla
        q1, lengths = q[:, 0], np.array([7])
        with pytest.raises(NotImplementedError, match="not float64"):
            jattn.decode_attention(q1, k, v, lengths, implementation="triton")
        got = jattn.decode_attention(q1, k, v, lengths)
        want = reference.decode_attention(q1, k, v, jnp.asarray(lengths))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12, rtol=1e-12)


# --- forward mode and second order --------------------------------------------------------------

AUTODIFF_SHAPE = (2, 6, 9, 4, 2, 8)  # B, T, S, N, K, H: GQA, T != S


def _autodiff_inputs(rng):
    q, k, v = make_inputs(rng, AUTODIFF_SHAPE)
    bias = jnp.asarray(rng.standard_normal((1, 4, 6, 9)), jnp.float32)
    options = dict(
        is_causal=True,
        q_offset=np.array([3, 1]),
        key_value_seq_lengths=np.array([9, 5]),
        logits_soft_cap=3.0,
    )
    return (q, k, v, bias), options


def _attention(implementation, options, residual=False):
    def run(q, k, v, bias):
        return jattn.dot_product_attention(
            q,
            k,
            v,
            bias,
            return_residual=residual,
            implementation=implementation,
            config=jattn.ChunkedConfig(block_q=4, block_k=4)
            if implementation == "xla_chunked"
            else None,
            **options,
        )

    return run


def _reference(options, residual=False):
    def run(q, k, v, bias):
        return reference.dot_product_attention(q, k, v, bias, return_residual=residual, **options)

    return run


@pytest.mark.parametrize("implementation", [None, "xla_chunked"])  # ('xla': the reference)
def test_forward_mode_jvp_and_jacfwd(rng, implementation):
    """Before: "can't apply forward-mode autodiff (jvp) to a custom_vjp function" on the default
    path. Tangents of the output and of the lse against the reference's, also under jit and vmap
    (jacfwd), and jacfwd against jacrev (the custom_vjp backward)."""
    primals, options = _autodiff_inputs(rng)
    tangents = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in primals)
    run = _attention(implementation, options, residual=True)
    want_primal, want_tangent = jax.jvp(_reference(options, residual=True), primals, tangents)
    jit_of_jvp = jax.jit(lambda p, t: jax.jvp(run, p, t))  # (a jvp of a jit cannot: docstring)
    for got_primal, got_tangent in (jax.jvp(run, primals, tangents), jit_of_jvp(primals, tangents)):
        pairs = zip((*got_primal, *got_tangent), (*want_primal, *want_tangent), strict=True)
        for got, want in pairs:
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)

    if implementation is None:  # auto takes xla_chunked here: its Jacobians are checked below
        return
    q_only = lambda q: _attention(implementation, options)(q, *primals[1:])[:, :2].sum(axis=(2, 3))
    forward = jax.jit(jax.jacfwd(q_only))(primals[0])
    backward = jax.jit(jax.jacrev(q_only))(primals[0])
    np.testing.assert_allclose(np.asarray(forward), np.asarray(backward), atol=2e-5, rtol=2e-5)


def test_hessian_and_grad_of_grad_on_the_default_path(rng):
    primals, options = _autodiff_inputs(rng)
    q, k, v, bias = primals
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(attention):
        return lambda q: jnp.sum(attention(q, k, v, bias) * weights)

    def one_row_loss(attention):  # the hessian in one query row of one head: 8 x 8
        return lambda row: loss(attention)(q.at[0, 2, 1].set(row))

    hessian = lambda attention: jax.jit(jax.hessian(one_row_loss(attention)))  # (jit: fewer
    got = hessian(_attention(None, options))(q[0, 2, 1])  # eager dispatches)
    want = hessian(_reference(options))(q[0, 2, 1])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5, rtol=5e-5)
    grad_of_grad = lambda attention: jax.jit(
        jax.grad(lambda q: jnp.sum(jax.grad(loss(attention))(q) ** 2))
    )
    got = grad_of_grad(_attention(None, options))(q)
    want = grad_of_grad(_reference(options))(q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5, rtol=5e-5)


def test_kernels_name_the_alternative_for_forward_mode_and_second_order(rng):
    """Before: the custom_vjp error from JAX under jvp, a bare AssertionError under grad(grad)
    on the Triton kernel."""
    primals, options = _autodiff_inputs(rng)
    q, k, v, bias = primals
    run = _attention("triton", options)
    message = r"jattn: implementation 'triton' .*implementation='xla_chunked'"
    with pytest.raises(NotImplementedError, match=message):
        jax.jvp(lambda q: run(q, k, v, bias), (q,), (q,))
    with pytest.raises(NotImplementedError, match=message):
        jax.grad(lambda q: jnp.sum(jax.grad(lambda q: run(q, k, v, bias).sum())(q) ** 2))(q)


# --- the gradient of the returned lse ---------------------------------------------------------


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked", "triton"])
def test_lse_gradient_is_the_float64_gradient_of_logsumexp(rng, implementation):
    """d/d(q, k, bias) of sum(w * lse) against float64 autodiff of logsumexp over the visible
    logits (causal, bottom-right: every row sees a key; GQA; soft cap; bias)."""
    batch, q_len, kv_len, heads, kv_heads, dim = AUTODIFF_SHAPE
    q, k, v = make_inputs(rng, AUTODIFF_SHAPE)
    bias = jnp.asarray(rng.standard_normal((1, heads, q_len, kv_len)), jnp.float32)
    weights = rng.standard_normal((batch, q_len, heads))
    options = dict(is_causal=True, q_offset=kv_len - q_len, logits_soft_cap=2.5, scale=0.4)
    config = {"xla_chunked": jattn.ChunkedConfig(block_q=4, block_k=4), "triton": SMALL_TRITON}

    def lse_loss(q, k, bias):
        _, lse = jattn.dot_product_attention(
            q,
            k,
            v,
            bias,
            return_residual=True,
            implementation=implementation,
            config=config.get(implementation),
            **options,
        )
        return jnp.sum(jnp.asarray(weights, jnp.float32) * lse.astype(jnp.float32))

    got = jax.grad(lse_loss, argnums=(0, 1, 2))(q, k, bias)
    with jax.enable_x64(True):

        def want_loss(q, k, bias):
            k = jnp.repeat(k, heads // kv_heads, axis=2)
            logits = 0.4 * jnp.einsum("btnh,bsnh->bnts", q, k)
            logits = 2.5 * jnp.tanh(logits / 2.5) + bias
            visible = np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + kv_len - q_len
            lse = jax.scipy.special.logsumexp(jnp.where(visible, logits, -jnp.inf), axis=-1)
            return jnp.sum(jnp.asarray(weights) * jnp.moveaxis(lse, 1, 2))

        as64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
        want = jax.grad(want_loss, argnums=(0, 1, 2))(as64(q), as64(k), as64(bias))
    for name, g, w in zip(("dq", "dk", "dbias"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5, rtol=3e-5, err_msg=name)


def test_mosaic_serves_x64(rng):
    """Under global jax_enable_x64 (as a script sets it) `implementation='mosaic'` runs (it
    declined x64 until stop 29): its kernels hold no 64-bit value (the test below), and on the
    H200 under x64 both features of the -m gpu test further down match the float64 oracle,
    output and gradients. Segments, causal and lengths, interpreted, against the oracle."""
    config = jattn.MosaicConfig(block_q=64, block_kv=64, num_stages=2)
    try:
        jax.config.update("jax_enable_x64", True)
        shape = (2, 70, 90, 1, 1, 64)  # one head: per-batch lengths and ids need B = 2
        options = make_options(rng, "segments_causal_lengths", shape)
        q, k, v = make_inputs(rng, shape, jnp.bfloat16)

        def mosaic(q, k, v):
            return jattn.dot_product_attention(
                q, k, v, implementation="mosaic", config=config, **options
            )

        errors = _errors_against_oracle(rng, dict(mosaic=mosaic), q, k, v, options)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert max(errors["mosaic"].values()) <= 1, errors


def _mosaic_under_x64(rng, feature, shape, config=None, x64=True):
    """(q, k, v, mosaic(q, k, v) -> out, options) made with jax_enable_x64 on globally (as a
    script sets it; the caller turns it off): the Mosaic kernels called directly. x64=False:
    the same call and inputs without it."""
    from jattn.attention import check_attention_args, option_kwargs
    from pallas_kernels import flash_mosaic

    jax.config.update("jax_enable_x64", x64)
    options = make_options(rng, feature, shape)
    q, k, v = make_inputs(rng, shape, jnp.bfloat16)

    def mosaic(q, k, v):
        args = check_attention_args(q, k, v, **options)
        out, _ = flash_mosaic.flash_attention(
            q, k, v, args.bias, args.mask, config=config, **option_kwargs(args)
        )
        return out

    return q, k, v, mosaic, options


def _sum_of_squares(run):
    return lambda q, k, v: jnp.sum(run(q, k, v).astype(jnp.float32) ** 2)


@pytest.mark.parametrize(
    "feature, redo",
    [
        ("causal_window_bias_softcap", False),
        ("segments_causal_lengths", False),
        ("causal_window_bias_softcap", True),  # redo_hidden's marks and second pass
    ],
)
def test_mosaic_kernels_trace_int32_under_x64(rng, feature, redo, monkeypatch):
    """What lets Mosaic serve x64: traced for the GPU with jax_enable_x64 on (set
    globally, as a script sets it), the forward, dq and dk/dv kernels hold no 64-bit value:
    their index arithmetic divides by int32 literals (`mosaic_common.idiv` / `irem`), where lax
    refused an int32 index by a Python int before, and a float64 bias streams as float32 in the
    backward too (`mosaic_common.bias_dtype`; the H200 ran out of shared memory on it)."""
    from pallas_kernels import common

    from cases import kernel_64bit_values

    monkeypatch.setattr(common, "interpret_mode", lambda: False)
    config = jattn.MosaicConfig(
        block_q=64, block_kv=64, num_stages=2, redo_hidden=redo, bwd_redo_hidden=redo
    )
    try:
        q, k, v, mosaic, _ = _mosaic_under_x64(rng, feature, (1, 150, 200, 2, 1, 64), config)
        grads = jax.grad(_sum_of_squares(mosaic), argnums=(0, 1, 2))
        jaxpr = jax.make_jaxpr(grads)(q, k, v).jaxpr
    finally:
        jax.config.update("jax_enable_x64", False)
    assert kernel_64bit_values(jaxpr) == []


def _errors_against_oracle(rng, runs, q, k, v, options) -> dict:
    """{name: {out, dq, dk, dv: max |error| / the bf16 tolerance}} of each run(q, k, v) -> out
    against the float64 oracle, under one random output cotangent; the tolerance of the grads
    is relative to their largest value (`cases.check_against_oracle`'s). Above 1 fails."""
    want_out, _, cache, _ = oracle_attention(q, k, v, options)
    d_out = jnp.asarray(rng.standard_normal(q.shape), q.dtype)
    want = oracle.attention_vjp(cache, np.asarray(d_out.astype(jnp.float32), np.float64))[:3]
    errors = {}
    for name, run in runs.items():
        out, vjp = jax.vjp(run, q, k, v)
        got = dict(out=out, **dict(zip(("dq", "dk", "dv"), vjp(d_out), strict=True)))
        wanted = dict(out=want_out, **dict(zip(("dq", "dk", "dv"), want, strict=True)))
        errors[name] = {}
        for part, x in got.items():
            x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
            atol, rtol = TOLERANCE[jnp.bfloat16] if part == "out" else GRAD_TOLERANCE[jnp.bfloat16]
            if part != "out":
                atol, rtol = (t * max(1.0, np.abs(wanted[part]).max()) for t in (atol, rtol))
            ratio = np.abs(x - wanted[part]) / (atol + rtol * np.abs(wanted[part]))
            errors[name][part] = float(ratio.max())
    print(errors)
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["causal_window_bias_softcap", "segments_causal_lengths"])
def test_mosaic_kernels_compiled_under_x64_match_xla(rng, feature):
    """On the GPU (compiled, no interpreter): the Mosaic kernels under global jax_enable_x64,
    output and gradients, against the float64 oracle (the XLA path's errors printed beside
    them)."""
    try:
        q, k, v, mosaic, options = _mosaic_under_x64(rng, feature, (2, 300, 333, 4, 2, 128))

        def xla(q, k, v):
            return jattn.dot_product_attention(q, k, v, implementation="xla", **options)

        errors = _errors_against_oracle(rng, dict(mosaic=mosaic, xla=xla), q, k, v, options)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert max(errors["mosaic"].values()) <= 1, errors


@pytest.mark.gpu
def test_mosaic_segments_inputs_of_the_x64_test_compiled_without_x64():
    """The inputs of `test_mosaic_kernels_compiled_under_x64_match_xla[segments_causal_lengths]`
    (its seed), the same kernel calls without x64, against the float64 oracle: on the H200
    (stops 28 and 29) that test's dq missed the XLA path's in 9 elements of batch 1, rows
    224-225 (rows 191-299 all see just keys 224-226 there), by up to 0.21 absolute, under an
    absolute tolerance since made relative to the largest gradient, as everywhere else; this
    says whether x64 changes anything."""
    import zlib

    node = "tests/test_x64_autodiff.py::test_mosaic_kernels_compiled_under_x64_match_xla"
    rng = np.random.default_rng(zlib.crc32(f"{node}[segments_causal_lengths]".encode()))
    shape = (2, 300, 333, 4, 2, 128)
    q, k, v, mosaic, options = _mosaic_under_x64(rng, "segments_causal_lengths", shape, x64=False)

    def xla(q, k, v):
        return jattn.dot_product_attention(q, k, v, implementation="xla", **options)

    errors = _errors_against_oracle(rng, dict(mosaic=mosaic, xla=xla), q, k, v, options)
    assert max(errors["mosaic"].values()) <= 1, errors
