"""`jattn.flex_attention` and `create_block_mask`: built-in options written as mods equal the
options; ALiBi, T5 relative bias, prefix-LM, document masks, dilated windows and sink tokens
against a float64 oracle with gradients (closed-over tables included), on 'xla' and on the Triton
kernel in Pallas interpret mode; block masks under jit, reused; argument checks."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import reference

import oracle
from cases import (
    GRAD_TOLERANCE,
    TOLERANCE,
    assert_close,
    lse_tolerance,
    make_inputs,
    run_state_literals,
)

# 16 x 16 tiles (the smallest Triton allows): short sequences still span several tiles, and
# the odd lengths pad the last query and key tiles.
BLOCK = 16
SMALL = jattn.TritonConfig(block_q=BLOCK, block_k=BLOCK, bwd_block_q=BLOCK, bwd_block_k=BLOCK)
# (B, T, S, N, K, H): GQA 2, T != S, odd lengths; and T > S with MQA.
SHAPE = (2, 19, 37, 2, 1, 16)
SHAPE_T_GT_S = (1, 35, 21, 2, 1, 16)
IMPLEMENTATIONS = ("xla", "triton")


def _flex(q, k, v, implementation, score_mod=None, mask_mod=None, block=False):
    """flex_attention with the lse; 'triton' with 16 x 16 tiles, and a block mask if `block`."""
    batch, q_len, heads, _ = q.shape
    block_mask = None
    if block and mask_mod is not None:
        block_mask = jattn.create_block_mask(
            mask_mod, batch, heads, q_len, k.shape[1], block_q=BLOCK, block_kv=BLOCK
        )
    return jattn.flex_attention(
        q,
        k,
        v,
        score_mod=score_mod,
        mask_mod=mask_mod,
        block_mask=block_mask,
        return_residual=True,
        implementation=implementation,
        config=SMALL if implementation == "triton" else None,
    )


def _cotangents(rng, out, lse):
    """Random cotangents in the output dtype (0 where the lse is -inf)."""
    finite = np.isfinite(np.asarray(lse.astype(jnp.float32)))
    d_lse = np.where(finite, rng.standard_normal(lse.shape), 0.0)
    return jnp.asarray(rng.standard_normal(out.shape), out.dtype), jnp.asarray(d_lse, lse.dtype)


def _wide(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def _assert_matches(got, want, grads, want_grads, dtype=jnp.float32):
    """got/want: (out, lse); grads/want_grads: dicts of results in dtype and float64 oracles."""
    (out, lse), (want_out, want_lse) = got, want
    assert out.dtype == dtype and lse.dtype == dtype
    want_lse = np.asarray(want_lse, np.float64)
    assert_close(out, want_out, TOLERANCE[dtype], "out")
    lse = np.asarray(lse.astype(jnp.float32))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse), "lse -inf")
    finite = np.isfinite(want_lse)
    assert_close(lse[finite], want_lse[finite], lse_tolerance(dtype), "lse")
    for name, expected in want_grads.items():
        got_grad = np.asarray(jnp.asarray(grads[name]).astype(jnp.float32), np.float64)
        assert np.isfinite(got_grad).all(), name
        scale = max(1.0, np.abs(expected).max())
        tolerance = tuple(t * scale for t in GRAD_TOLERANCE[dtype])
        assert_close(got_grad, np.asarray(expected, np.float64), tolerance, name)


# --- built-in options written as mods ----------------------------------------------------------


def _builtin_case(name, rng, shape):
    """(score_mod, mask_mod, options of jattn.dot_product_attention that mean the same)."""
    batch, q_len, kv_len = shape[:3]
    match name:
        case "causal":
            return None, lambda b, h, i, j: j <= i, dict(is_causal=True)
        case "sliding_window":
            mask = lambda b, h, i, j: (j >= i - 5) & (j <= i + 2)  # noqa: E731
            return None, mask, dict(local_window_size=(5, 2))
        case "soft_cap":
            score = lambda s, b, h, i, j: 2.0 * jnp.tanh(s / 2.0)  # noqa: E731
            return score, None, dict(logits_soft_cap=2.0)
        case "segment_ids":
            q_ids = jnp.asarray(np.sort(rng.integers(0, 3, (batch, q_len)), axis=1), jnp.int32)
            kv_ids = jnp.asarray(np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1), jnp.int32)
            mask = lambda b, h, i, j: q_ids[b, i] == kv_ids[b, j]  # noqa: E731
            return None, mask, dict(segment_ids=(q_ids, kv_ids))
        case "q_offset":
            offset = jnp.asarray(rng.integers(-3, kv_len - q_len + 4, batch), jnp.int32)
            mask = lambda b, h, i, j: j <= i + offset[b]  # noqa: E731
            return None, mask, dict(is_causal=True, q_offset=offset)
    raise AssertionError(name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "name", ["causal", "sliding_window", "soft_cap", "segment_ids", "q_offset"]
)
def test_builtin_option_as_mod_equals_the_option(rng, name, implementation):
    q, k, v = make_inputs(rng, SHAPE)
    score_mod, mask_mod, options = _builtin_case(name, rng, SHAPE)
    run = lambda q, k, v: _flex(q, k, v, implementation, score_mod, mask_mod, block=True)  # noqa: E731
    (out, lse), vjp = jax.vjp(run, q, k, v)
    d_out, d_lse = _cotangents(rng, out, lse)
    grads = dict(zip(("dq", "dk", "dv"), vjp((d_out, d_lse)), strict=True))
    with jax.enable_x64(True):
        wide = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        option_run = lambda q, k, v: reference.dot_product_attention(  # noqa: E731
            q, k, v, return_residual=True, **options
        )
        want, want_vjp = jax.vjp(option_run, *wide)
        want_grads = want_vjp((jnp.asarray(d_out, jnp.float64), jnp.asarray(d_lse, jnp.float64)))
        want = tuple(np.asarray(x) for x in want)
        want_grads = {n: np.asarray(g) for n, g in zip(("dq", "dk", "dv"), want_grads, strict=True)}
    _assert_matches((out, lse), want, grads, want_grads)


# --- variants against a float64 oracle ----------------------------------------------------------


def _t5_bucket(relative, xp, num_buckets=8, max_distance=16):
    """T5's bidirectional relative-position bucket of kv - q (xp: jnp or np)."""
    half = num_buckets // 2
    exact = half // 2
    bucket = (relative > 0) * half
    distance = xp.abs(relative)
    log_ratio = xp.log(xp.maximum(distance, 1) / exact) / np.log(max_distance / exact)
    large = xp.minimum(exact + (log_ratio * (half - exact)).astype(xp.int32), half - 1)
    return bucket + xp.where(distance < exact, distance, large)


def _variant(name, rng, shape):
    """(params, make_mods(params) -> (score_mod, mask_mod), dense(params) -> (bias, visible),
    param_grads(dbias, params) -> {name: grad}) with numpy float64 oracles."""
    batch, q_len, kv_len, heads = shape[:4]
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    grid = (batch, heads, q_len, kv_len)
    no_grads = lambda dbias, params: {}  # noqa: E731
    match name:
        case "alibi":  # learnable slopes: s - slope[h] * |i - j|
            params = dict(slopes=rng.uniform(0.1, 1.0, heads))

            def mods(p):
                return lambda s, b, h, qi, kj: s - p["slopes"][h] * jnp.abs(qi - kj), None

            def dense(p):
                return -p["slopes"][None, :, None, None] * np.abs(i - j), None

            def grads(dbias, p):
                return dict(slopes=-(dbias * np.abs(i - j)).sum(axis=(0, 2, 3)))

            return params, mods, dense, grads
        case "t5_bias":  # learnable [buckets, N] table, indexed by the relative position
            params = dict(table=rng.standard_normal((8, heads)))
            buckets = _t5_bucket(j - i, np)  # [T, S]

            def mods(p):
                return lambda s, b, h, qi, kj: s + p["table"][_t5_bucket(kj - qi, jnp), h], None

            def dense(p):
                return np.moveaxis(p["table"][buckets], -1, 0)[None], None

            def grads(dbias, p):
                d_table = np.zeros(p["table"].shape)
                for n in range(heads):
                    np.add.at(d_table[:, n], buckets, dbias[:, n].sum(axis=0))
                return dict(table=d_table)

            return params, mods, dense, grads
        case "prefix_lm":  # a bidirectional prefix of prefix[b] tokens, causal after
            prefix = rng.integers(0, q_len, batch)
            prefix_j = jnp.asarray(prefix, jnp.int32)

            def mods(p):
                return None, lambda b, h, qi, kj: (kj <= qi) | (kj < prefix_j[b])

            def dense(p):
                return None, (j <= i) | (j < prefix[:, None, None, None])

            return {}, mods, dense, no_grads
        case "document":  # causal within each packed document
            docs = np.sort(rng.integers(0, 4, (batch, max(q_len, kv_len))), axis=1)
            docs_j = jnp.asarray(docs, jnp.int32)

            def mods(p):
                return None, lambda b, h, qi, kj: (docs_j[b, qi] == docs_j[b, kj]) & (kj <= qi)

            def dense(p):
                same = docs[:, :q_len, None] == docs[:, None, :kv_len]
                return None, (same & (j <= i))[:, None]

            return {}, mods, dense, no_grads
        case "dilated_window":  # every 2nd key within 8 to the left
            width, step = 8, 2

            def mods(p):
                return (
                    None,
                    lambda b, h, qi, kj: (
                        (kj <= qi) & (qi - kj < width * step) & ((qi - kj) % step == 0)
                    ),
                )

            def dense(p):
                return None, (j <= i) & (i - j < width * step) & ((i - j) % step == 0)

            return {}, mods, dense, no_grads
        case "sinks":  # StreamingLLM: 2 sink tokens and a causal window of 4

            def mods(p):
                return None, lambda b, h, qi, kj: (kj <= qi) & ((kj < 2) | (qi - kj < 4))

            def dense(p):
                return None, (j <= i) & ((j < 2) | (i - j < 4))

            return {}, mods, dense, no_grads
    del grid
    raise AssertionError(name)


VARIANTS = ("alibi", "t5_bias", "prefix_lm", "document", "dilated_window", "sinks")


def _check_variant(rng, name, shape, implementation, block=True, dtype=jnp.float32):
    q, k, v = make_inputs(rng, shape, dtype)
    params, mods, dense, param_grads = _variant(name, rng, shape)
    jparams = {n: jnp.asarray(p, jnp.float32) for n, p in params.items()}

    def run(q, k, v, p):
        score_mod, mask_mod = mods(p)
        return _flex(q, k, v, implementation, score_mod, mask_mod, block=block)

    (out, lse), vjp = jax.vjp(run, q, k, v, jparams)
    d_out, d_lse = _cotangents(rng, out, lse)
    dq, dk, dv, d_params = vjp((d_out, d_lse))

    rounded = {n: np.asarray(p, np.float64) for n, p in jparams.items()}
    bias, visible = dense(rounded)
    full = (shape[0], shape[3], shape[1], shape[2])
    visible = np.ones(full, bool) if visible is None else np.broadcast_to(visible, full)
    bias = None if bias is None else np.broadcast_to(bias, full)
    q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    want_out, want_lse, cache = oracle.attention(q64, k64, v64, bias, visible=visible)
    want_dq, want_dk, want_dv, dbias = oracle.attention_vjp(
        cache, _wide(d_out), _wide(d_lse), None if bias is None else full
    )
    want_grads = dict(dq=want_dq, dk=want_dk, dv=want_dv)
    grads = dict(dq=dq, dk=dk, dv=dv)
    for n, g in param_grads(dbias, rounded).items():
        want_grads[n], grads[n] = g, d_params[n]
    _assert_matches((out, lse), (want_out, want_lse), grads, want_grads, dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_float64_oracle(rng, name, implementation):
    _check_variant(rng, name, SHAPE, implementation)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_triton_half_precision_t5_bias(rng, dtype):
    """A learnable table in a half-precision call: the table's gradient comes back in float32
    (its dtype), q, k, v ones in dtype, against the float64 oracle on the rounded inputs."""
    _check_variant(rng, "t5_bias", SHAPE, "triton", dtype=dtype)


@pytest.mark.parametrize("name", ["alibi", "document"])
def test_triton_t_gt_s_mqa_without_block_mask(rng, name):
    """T > S, MQA, and the mask_mod evaluated on every tile (no block mask)."""
    _check_variant(rng, name, SHAPE_T_GT_S, "triton", block=False)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fully_masked_rows_give_zero_and_no_nan(rng, implementation):
    """Rows 0..4 see no key: output 0, lse -inf, zero gradients (others as the oracle)."""
    q, k, v = make_inputs(rng, SHAPE)
    mask_mod = lambda b, h, i, j: j <= i - 5  # noqa: E731
    run = lambda q, k, v: _flex(q, k, v, implementation, None, mask_mod, block=True)  # noqa: E731
    (out, lse), vjp = jax.vjp(run, q, k, v)
    d_out, d_lse = _cotangents(rng, out, lse)
    dq, dk, dv = vjp((d_out, d_lse))
    assert (np.asarray(out[:, :5]) == 0).all() and np.isneginf(np.asarray(lse[:, :5])).all()
    assert (np.asarray(dq[:, :5]) == 0).all()
    want = reference.dot_product_attention(
        q, k, v, is_causal=True, q_offset=-5, return_residual=True
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), atol=2e-5, rtol=2e-5)
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()


def test_hidden_nan_keys_never_reach_a_query(rng):
    """NaN keys in one document reach no query of the others (masked tiles multiply by zeroed
    copies; empty blocks are never loaded), on both implementations; forward-mode autodiff on
    the kernel is a NotImplementedError naming 'xla', which serves it."""
    shape = (1, 32, 32, 2, 1, 16)
    q, k, v = make_inputs(rng, shape)
    docs = jnp.asarray(np.repeat([0, 1, 2], [10, 12, 10])[None], jnp.int32)
    k = k.at[0, 12].set(jnp.nan)  # in document 1
    same = lambda b, h, i, j: docs[b, i] == docs[b, j]  # noqa: E731
    for implementation in IMPLEMENTATIONS:
        out, lse = _flex(q, k, v, implementation, None, same, block=True)
        in_doc = np.asarray(docs[0] == 1)
        assert np.isnan(np.asarray(out)[0, in_doc]).all(), implementation
        assert np.isfinite(np.asarray(out)[0, ~in_doc]).all(), implementation
    tangent = jnp.ones_like(q)
    with pytest.raises(NotImplementedError, match="implementation='xla'"):
        jax.jvp(lambda q: _flex(q, k, v, "triton", None, same)[0], (q,), (tangent,))
    _, jvp_out = jax.jvp(lambda q: jattn.flex_attention(q, k, v, mask_mod=same), (q,), (tangent,))
    assert np.isfinite(np.asarray(jvp_out)[0, ~in_doc]).all()


def test_mosaic_flex_hidden_nan_value_reaches_no_other_document(rng):
    """The Mosaic kernel (interpret mode) under a mask_mod and its block mask: a NaN value in
    one document's key makes that document's rows NaN and no other's (`clean_tile` zeroes it in
    the partial blocks before P V), and the other rows equal the clean call's."""
    shape = (1, 150, 150, 1, 1, 64)  # one head: the mask reads no h
    q, k, v = make_inputs(rng, shape, jnp.bfloat16)
    docs = jnp.asarray(np.repeat([0, 1, 2], [40, 60, 50])[None], jnp.int32)
    same = lambda b, h, i, j: docs[b, i] == docs[b, j]  # noqa: E731
    block_mask = jattn.create_block_mask(same, 1, 1, 150, 150, block_q=128, block_kv=128)

    def run(v):
        return jattn.flex_attention(q, k, v, block_mask=block_mask, implementation="mosaic")

    want, got = run(v), run(v.at[0, 70].set(jnp.nan))  # key 70: in document 1
    in_doc = np.asarray(docs[0] == 1)
    assert np.isnan(np.asarray(got, np.float32)[0, in_doc]).any(axis=-1).all()
    others = np.asarray(got, np.float32)[0, ~in_doc]
    np.testing.assert_allclose(others, np.asarray(want, np.float32)[0, ~in_doc], atol=2e-2)


# --- block masks ---------------------------------------------------------------------------------


def test_block_mask_states_and_broadcast():
    causal = lambda b, h, i, j: j <= i  # noqa: E731
    mask = jattn.create_block_mask(causal, None, None, 40, 40, block_q=16, block_kv=16)
    assert mask.shape == (1, 1, 40, 40)
    # block rows 0..2 (row 2 holds padding past T = 40, so nothing is full there)
    want = np.array([[1, 0, 0], [2, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(mask.to_dense())[0, 0], want)
    heads = jattn.create_block_mask(
        lambda b, h, i, j: (j <= i) | (h == 1), 2, 3, 40, 40, block_q=16, block_kv=16
    )
    states = np.asarray(heads.to_dense())
    assert states.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(states[:, 0], np.broadcast_to(want, (2, 3, 3)))
    np.testing.assert_array_equal(states[:, 1, :2, :2], 2)  # head 1 sees every key (S pads)


def test_empty_blocks_are_skipped_and_full_blocks_unmasked(rng):
    """With a causal block mask and a mask_mod that hides nothing, the kernel must give
    block-causal attention: keys of empty blocks never reached a query, full blocks had no
    mask arithmetic (a kernel that masked every tile with the mask_mod would see every key)."""
    shape = (1, 32, 32, 2, 1, 16)
    q, k, v = make_inputs(rng, shape)
    block_mask = jattn.create_block_mask(
        lambda b, h, i, j: j <= i, None, None, 32, 32, block_q=BLOCK, block_kv=BLOCK
    )
    everything = lambda b, h, i, j: jnp.bool_(True)  # noqa: E731
    out = jattn.flex_attention(
        q, k, v, mask_mod=everything, block_mask=block_mask, implementation="triton"
    )
    block_causal = lambda b, h, i, j: j // BLOCK <= i // BLOCK  # noqa: E731
    want = jattn.flex_attention(q, k, v, mask_mod=block_causal, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_block_mask_built_under_jit_and_reused(rng):
    """create_block_mask under jit with traced document ids, reused by two calls (layers) in
    one jitted step and again by a second step; equal to 'xla'."""
    batch, q_len, _, heads, _, _ = SHAPE
    shape = (batch, q_len, q_len, heads, 2, 16)
    q, k, v = make_inputs(rng, shape)
    docs = jnp.asarray(np.sort(rng.integers(0, 3, (batch, q_len)), axis=1), jnp.int32)

    @jax.jit
    def build(docs):
        same = lambda b, h, i, j: docs[b, i] == docs[b, j]  # noqa: E731
        return jattn.create_block_mask(same, batch, None, q_len, q_len, block_q=16, block_kv=16)

    @jax.jit
    def step(q, k, v, docs, block_mask):
        same = lambda b, h, i, j: docs[b, i] == docs[b, j]  # noqa: E731
        first = jattn.flex_attention(
            q, k, v, mask_mod=same, block_mask=block_mask, implementation="triton", config=SMALL
        )
        return jattn.flex_attention(
            first, k, v, mask_mod=same, block_mask=block_mask, implementation="triton"
        )

    block_mask = build(docs)
    assert isinstance(block_mask, jattn.BlockMask)
    got = step(q, k, v, docs, block_mask)
    again = step(q * 0.5, k, v, docs, block_mask)
    same = lambda b, h, i, j: docs[b, i] == docs[b, j]  # noqa: E731
    for query, result in ((q, got), (q * 0.5, again)):
        first = jattn.flex_attention(query, k, v, mask_mod=same, implementation="xla")
        want = jattn.flex_attention(first, k, v, mask_mod=same, implementation="xla")
        np.testing.assert_allclose(np.asarray(result), np.asarray(want), atol=3e-5, rtol=3e-5)


# --- argument checks -----------------------------------------------------------------------------


def test_argument_errors_name_the_shapes():
    q = jnp.ones((1, 8, 4, 16))
    kv = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match=r"\[B, T, N, H\]"):
        jattn.flex_attention(q[0], kv, kv)
    with pytest.raises(ValueError, match="GQA"):
        jattn.flex_attention(q, jnp.ones((1, 8, 3, 16)), jnp.ones((1, 8, 3, 16)))
    with pytest.raises(ValueError, match="with query's B and H"):
        jattn.flex_attention(q, jnp.ones((1, 8, 2, 8)), kv)
    block_mask = jattn.create_block_mask(lambda b, h, i, j: j <= i, None, None, 8, 9)
    with pytest.raises(ValueError, match=r"block_mask of shape .*\(1, 1, 8, 9\)"):
        jattn.flex_attention(q, kv, kv, block_mask=block_mask)
    with pytest.raises(ValueError, match="implementation"):
        jattn.flex_attention(q, kv, kv, implementation="cudnn")
    with pytest.raises(ValueError, match="B must be an int >= 1 or None"):
        jattn.create_block_mask(lambda b, h, i, j: True, 0, None, 8, 8)
    with pytest.raises(NotImplementedError, match="powers of two"):
        odd = jattn.create_block_mask(lambda b, h, i, j: True, None, None, 8, 8, block_q=24)
        jattn.flex_attention(q, kv, kv, block_mask=odd, implementation="triton")


# --- Flax ---------------------------------------------------------------------------------------


def test_flax_layer_with_mods_equals_the_options(rng):
    """MultiHeadAttention(score_mod=soft cap, is_causal) equals the layer with logits_soft_cap
    and is_causal (same weights); a document mask_mod with a block mask equals segment_ids."""
    from flax import nnx

    x = jnp.asarray(rng.standard_normal((2, 11, 32)), jnp.float32)
    common = dict(num_kv_heads=2, is_causal=True, implementation="xla")
    cap = lambda s, b, h, i, j: 2.0 * jnp.tanh(s / 2.0)  # noqa: E731
    flex_layer = jattn.nn.MultiHeadAttention(4, 32, score_mod=cap, **common, rngs=nnx.Rngs(0))
    option_layer = jattn.nn.MultiHeadAttention(
        4, 32, logits_soft_cap=2.0, **common, rngs=nnx.Rngs(0)
    )
    np.testing.assert_allclose(flex_layer(x), option_layer(x), atol=2e-5, rtol=2e-5)

    docs = jnp.asarray(np.sort(rng.integers(0, 3, (2, 11)), axis=1), jnp.int32)
    same = lambda b, h, i, j: docs[b, i] == docs[b, j]  # noqa: E731
    doc_layer = jattn.nn.MultiHeadAttention(4, 32, mask_mod=same, **common, rngs=nnx.Rngs(0))
    causal_same = lambda b, h, i, j: same(b, h, i, j) & (j <= i)  # noqa: E731
    block_mask = jattn.create_block_mask(causal_same, 2, None, 11, 11, block_q=16, block_kv=16)
    plain_layer = jattn.nn.MultiHeadAttention(4, 32, **common, rngs=nnx.Rngs(0))
    want = plain_layer(x, segment_ids=(docs, docs))
    np.testing.assert_allclose(doc_layer(x, block_mask=block_mask), want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="takes no bias"):
        doc_layer(x, bias=jnp.zeros((11, 11)))


# --- the GPU lowering, checked on the CPU ---------------------------------------------------------


@pytest.mark.parametrize("learn_table", [False, True])
def test_triton_kernels_lower_for_cuda(rng, monkeypatch, learn_table):
    """The compiled (not interpreted) kernels lower to Triton for CUDA, forward and backward, with
    a score_mod and mask_mod that index closed-over arrays (ALiBi slopes, a relative-bias table,
    document ids) and a block mask: Pallas' Triton backend lowers no gather, so the mods' element
    reads must have become loads (jattn.flex._eval_mod). jax.export lowers for 'cuda' without a
    GPU; nothing runs."""
    from pallas_kernels import common

    monkeypatch.setattr(common, "interpret_mode", lambda: False)
    batch, length, heads, dim = 1, 128, 2, 64
    slopes = jnp.asarray(rng.uniform(0.1, 1.0, heads), jnp.float32)
    docs = jnp.asarray(np.sort(rng.integers(0, 3, (batch, length)), axis=1), jnp.int32)

    def loss(q, k, v, table):
        def score_mod(s, b, h, i, j):
            return s - slopes[h] * jnp.abs(i - j) + table[jnp.clip(j - i + 4, 0, 7), h]

        def mask_mod(b, h, i, j):
            return (docs[b, i] == docs[b, j]) & (j <= i)

        block_mask = jattn.create_block_mask(
            mask_mod, batch, None, length, length, block_q=64, block_kv=64
        )
        out = jattn.flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            mask_mod=mask_mod,
            block_mask=block_mask,
            implementation="triton",
        )
        return out.astype(jnp.float32).sum()

    q = jnp.zeros((batch, length, heads, dim), jnp.bfloat16)
    kv = jnp.zeros((batch, length, 1, dim), jnp.bfloat16)
    table = jnp.zeros((8, heads), jnp.float32)
    argnums = (0, 1, 2, 3) if learn_table else (0, 1, 2)
    step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(step, platforms=["cuda"], disabled_checks=checks)(q, kv, kv, table)
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") >= 3  # forward, dq, dk/dv kernels


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["alibi", "t5_bias", "document"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_variant_real_size_on_gpu(rng, monkeypatch, name, dtype):
    """The compiled Triton kernel at real lengths (GQA, T != S, odd lengths) on the kernel's
    default tiles, block masks of 64 x 64, against the float64 oracle with gradients (the
    learnable table's included)."""
    monkeypatch.setattr(sys.modules[__name__], "BLOCK", 64)
    monkeypatch.setattr(sys.modules[__name__], "SMALL", None)
    _check_variant(rng, name, (2, 1000, 1031, 8, 2, 64), "triton", dtype=dtype)


def test_block_mask_tiles_shed_stages_to_fit_shared_memory(monkeypatch):
    """Before: a block mask's 128 x 128 blocks at H=128 (bf16) kept the backward's 2 stages and
    failed on the H200 ("requested 295936, available: 232448"). Now each pipeline sheds stages
    to fit; blocks that do not fit in one stage get a ValueError naming them."""
    from pallas_kernels import flash_triton

    monkeypatch.setattr(flash_triton.common, "shared_memory_bytes", lambda: 232448)
    tiles = dict(block_q=128, block_k=128, bwd_block_q=128, bwd_block_k=128)
    config = dataclasses.replace(flash_triton.default_config(128, jnp.bfloat16), **tiles)
    fitted = flash_triton._fit_stages_to_tiles(config, head_dim=128, itemsize=2, pair_itemsize=0)
    # forward: 32 kB resident + 64 kB a stage (3 stages: 224 kB fit); backward: 64 kB resident
    # + 64 kB a stage with its spare tile (2 stages: 256 kB do not, 1: 192 kB)
    assert (fitted.num_stages, fitted.bwd_num_stages) == (config.num_stages, 1) == (3, 1)
    q = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    causal = lambda b, h, i, j: j <= i  # noqa: E731
    mask = jattn.create_block_mask(causal, None, None, 512, 512, block_q=256, block_kv=256)
    with pytest.raises(ValueError, match=r"256 x 256 blocks .* dq kernel .* block_q=64"):
        jax.eval_shape(
            lambda q: jattn.flex_attention(q, q, q, block_mask=mask, implementation="triton"), q
        )


# --- the Mosaic GPU kernel's flex forward (Hopper; interpret mode here) -------------------------

MOSAIC_SHAPE = (1, 150, 330, 2, 1, 64)  # two 128-row programs, 3 key tiles of 128, GQA 2


def _mosaic_case(name, shape):
    """(score_mod, mask_mod, use a block mask, dense float64 (bias, visible)): mods that close
    over no arrays, the kind the Mosaic path serves."""
    _, q_len, kv_len, heads = shape[:4]
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    slopes = np.exp2(-8.0 * (np.arange(heads) + 1) / heads)

    def alibi(s, b, h, qi, kj):
        return s - jnp.exp2(-8.0 * (h + 1) / heads) * jnp.abs(qi - kj).astype(jnp.float32)

    alibi_bias = -slopes[None, :, None, None] * np.abs(i - j)
    bottom_right = lambda b, h, qi, kj: kj <= qi + (kv_len - q_len)  # noqa: E731
    window = lambda b, h, qi, kj: jnp.abs(qi + (kv_len - q_len) - kj) <= 40  # noqa: E731
    match name:
        case "alibi_score_mod":  # every tile unmasked but the padded keys
            return alibi, None, False, (alibi_bias, None)
        case "causal_block_mask_with_alibi":  # rows 0-127 visit key blocks 1, 2 (partial), 0 (full)
            return alibi, bottom_right, True, (alibi_bias, j <= i + (kv_len - q_len))
        case "window_mask_mod":  # no block mask: the mask_mod on every tile
            return None, window, False, (None, np.abs(i + (kv_len - q_len) - j) <= 40)
        case "rows_that_see_nothing":  # rows 0..54 see no key: 0, lse -inf, zero gradients
            return None, lambda b, h, qi, kj: kj <= qi - 55, True, (None, j <= i - 55)
        case "documents_block_mask":  # documents of 100 tokens: empty, full and partial blocks
            same_doc = lambda b, h, qi, kj: qi // 100 == kj // 100  # noqa: E731
            return alibi, same_doc, True, (alibi_bias, i // 100 == j // 100)
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        # ALiBi on every tile without a block mask (-m slow): the default run has the same
        # score_mod under a causal block mask (its full block included) and the no-block-mask
        # path with the window's mask_mod
        pytest.param("alibi_score_mod", marks=pytest.mark.slow),
        "causal_block_mask_with_alibi",
        "window_mask_mod",
        "rows_that_see_nothing",
        # the documents with a block mask, ALiBi on top (-m slow, as the closed-over ids with
        # ALiBi below): the default run has the ids alone under a block mask, and the causal
        # block mask with ALiBi
        pytest.param("documents_block_mask", marks=pytest.mark.slow),
    ],
)
def test_mosaic_flex_matches_float64_oracle(rng, name, monkeypatch):
    """implementation='mosaic': the mods traced into the Mosaic GPU forward (over index
    vectors, broadcast into the tile where they meet), a block mask's lists read in the
    kernel; gradients from the Mosaic backward with the mods in its tiles (score_mod's
    derivative by jax.jvp) and the block mask's lists, the dq kernel's per query block and the
    dk/dv kernel's per key block (the Triton flex backward must not run)."""
    _forbid_triton_backward(monkeypatch)
    batch, q_len, kv_len, _, _, head_dim = MOSAIC_SHAPE  # one head where no mod reads h
    reads_h = "alibi" in name or name == "documents_block_mask"
    shape = MOSAIC_SHAPE if reads_h else (batch, q_len, kv_len, 1, 1, head_dim)
    _check_mosaic_case(rng, name, shape)


def _forbid_triton_backward(monkeypatch):
    from pallas_kernels import flash_triton

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton flex backward ran")

    monkeypatch.setattr(flash_triton, "flex_backward", no_triton)


def _matches_oracle(rng, run, q, k, v, bias, visible):
    """run(q, k, v) -> (out, lse) and its vjp against the float64 oracle with `bias` and
    `visible` (broadcast to [B, N, T, S]); returns (out, dq)."""
    (out, lse), vjp = jax.vjp(run, q, k, v)
    d_out, d_lse = _cotangents(rng, out, lse)
    dq, dk, dv = vjp((d_out, d_lse))
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    bias = None if bias is None else np.broadcast_to(bias, full)
    visible = np.ones(full, bool) if visible is None else np.broadcast_to(visible, full)
    q64, k64, v64 = (_wide(x) for x in (q, k, v))
    want_out, want_lse, cache = oracle.attention(q64, k64, v64, bias, visible=visible)
    want = oracle.attention_vjp(cache, _wide(d_out), _wide(d_lse), None)[:3]
    grads, want_grads = dict(dq=dq, dk=dk, dv=dv), dict(zip(("dq", "dk", "dv"), want, strict=True))
    _assert_matches((out, lse), (want_out, want_lse), grads, want_grads, jnp.bfloat16)
    return out, dq


@pytest.mark.parametrize(
    "head_dim, block_kv, fused_dq, bwd_block_kv",
    [
        # dK, dV split by columns: 4 dk/dv programs a list row, 4 dq steps (41 s interpreted)
        pytest.param(160, 256, False, 64, marks=pytest.mark.slow),
        (160, 128, False, 128),  # dq tiles of 128 keys: one step per listed block
        (64, 128, True, 64),  # dQ added up by the dk/dv kernel at the listed query blocks
        (64, 64, False, 64),  # a dk/dv program's 128 keys span two blocks: the Triton backward
    ],
)
def test_mosaic_flex_backward_visits_block_mask_lists(
    rng, head_dim, block_kv, fused_dq, bwd_block_kv, monkeypatch
):
    """The Mosaic backward under a block mask whose blocks are not its tiles: the dq kernel
    steps through each listed key block in 64-key tiles, the dk/dv kernel each listed query
    block in 64-row tiles; blocks its programs do not fit go to the Triton flex backward.
    Against the float64 oracle with gradients."""
    from pallas_kernels import flash_triton

    triton_backward, ran = flash_triton.flex_backward, []

    def counted(*args, **kwargs):
        ran.append(True)
        return triton_backward(*args, **kwargs)

    monkeypatch.setattr(flash_triton, "flex_backward", counted)
    # 128-key blocks: 0 and 2 listed, 1 empty; one head (the mask reads no h; GQA under a
    # block mask's lists: test_mosaic_flex_matches_float64_oracle)
    shape = (1, 100, 330, 1, 1, head_dim)
    q, k, v = make_inputs(rng, shape, jnp.bfloat16)
    q_len, kv_len = shape[1:3]
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    offset = kv_len - q_len
    mask_mod = lambda b, h, qi, kj: (kj <= qi + offset) & (kj // 128 != 1)  # noqa: E731
    visible = (j <= i + offset) & (j // 128 != 1)  # key block 1 of 128: empty
    block_mask = jattn.create_block_mask(mask_mod, None, None, q_len, kv_len, block_kv=block_kv)
    config = jattn.MosaicConfig(
        bwd_fused_dq=fused_dq, bwd_head_split=head_dim > 128, bwd_block_kv=bwd_block_kv
    )

    def run(q, k, v):
        return jattn.flex_attention(
            q, k, v, block_mask=block_mask, return_residual=True, implementation="mosaic",
            config=config,
        )  # fmt: skip

    _matches_oracle(rng, run, q, k, v, None, visible)
    assert ran == ([True] if block_kv == 64 else [])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name",
    [
        "alibi_score_mod",  # every tile unmasked: the benchmark's ALiBi
        "causal_block_mask_with_alibi",
        "documents_block_mask",
        "rows_that_see_nothing",
    ],
)
def test_mosaic_flex_real_size_on_gpu(rng, name):
    """The compiled Mosaic flex forward and backward (Hopper) at real lengths: GQA 4, T != S,
    odd lengths, H = 128 (the softmax overlap on), block-mask lists in every kernel, against
    the float64 oracle with gradients. rows_that_see_nothing is a mask_mod alone under a block
    mask: its full tiles read no index (JAX 0.11's layout search failed on the unused ones)."""
    _check_mosaic_case(rng, name, (2, 1000, 1031, 8, 2, 128))


def _check_mosaic_case(rng, name, shape):
    q, k, v = make_inputs(rng, shape, jnp.bfloat16)
    score_mod, mask_mod, use_blocks, (bias, visible) = _mosaic_case(name, shape)
    q_len, kv_len = shape[1:3]
    block_mask = None
    if use_blocks:
        block_mask = jattn.create_block_mask(mask_mod, None, None, q_len, kv_len)

    def run(q, k, v):
        return jattn.flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            mask_mod=mask_mod,
            block_mask=block_mask,
            return_residual=True,
            implementation="mosaic",
        )

    out, dq = _matches_oracle(rng, run, q, k, v, bias, visible)
    if name == "rows_that_see_nothing":
        assert (np.asarray(out[:, :55]) == 0).all() and (np.asarray(dq[:, :55]) == 0).all()


def test_mosaic_flex_backward_with_a_large_score_mod_and_padded_queries(rng):
    """A score_mod that lifts every logit by 120 (exp2 of it overflows float32 unless the row's
    lse takes it out): the 150 query rows pad to 256 in the backward, and the padded rows (zero
    queries, zero dO, lse 0) must be masked there, or inf * 0 reaches dK and dV. One head, one
    key program: the padded rows are what it checks."""
    q, k, v = make_inputs(rng, (1, 150, 128, 1, 1, 64), jnp.bfloat16)
    lift = lambda s, b, h, qi, kj: s + 120.0  # noqa: E731

    def grads(implementation):
        def loss(q, k, v):
            out = jattn.flex_attention(q, k, v, score_mod=lift, implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(64.0))[None, None, None])

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads("mosaic"), grads("xla"), strict=True):
        assert bool(jnp.isfinite(got).all())
        assert_close(got, np.asarray(want, np.float64), GRAD_TOLERANCE[jnp.bfloat16])


def test_mosaic_flex_declines_what_it_does_not_serve(rng):
    """float32, primitives Mosaic GPU does not lower and other block sizes: NotImplementedError
    naming the alternative (closed-over arrays: the test below)."""
    q, k, v = make_inputs(rng, MOSAIC_SHAPE, jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="float16/bfloat16"):
        jattn.flex_attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="mosaic")
    # what Mosaic GPU's lowering has no rule for, named before a compile fails on it
    t5_like = lambda s, b, h, qi, kj: s + jnp.log1p(jnp.abs(qi - kj).astype(jnp.float32))  # noqa: E731
    relu = lambda s, b, h, qi, kj: s - jax.nn.relu((qi - kj).astype(jnp.float32))  # noqa: E731
    for mod, names in ((t5_like, "log1p"), (relu, "custom_jvp_call")):
        with pytest.raises(NotImplementedError, match=rf"\['{names}'\].*does not lower.*'triton'"):
            jattn.flex_attention(q, k, v, score_mod=mod, implementation="mosaic")
    causal = lambda b, h, qi, kj: kj <= qi  # noqa: E731
    small = jattn.create_block_mask(causal, None, None, 150, 330, block_q=64, block_kv=64)
    with pytest.raises(NotImplementedError, match="programs of 128 query rows"):
        jattn.flex_attention(q, k, v, block_mask=small, implementation="mosaic")
    with pytest.raises(ValueError, match="mosaic needs a MosaicConfig, got TritonConfig"):
        jattn.flex_attention(q, k, v, implementation="mosaic", config=SMALL)


def test_mosaic_flex_takes_the_autotune_tables_non_causal_entry(rng, monkeypatch):
    """config=None on 'mosaic' takes the autotune table's non-causal entry for the call (the
    H200's entries time ALiBi 7-12% faster than default_config, stop 29), here a stand-in
    with the >4k entry's schedule; a config given is used as given. The forward with the
    table's config against the float64 oracle."""
    from jattn import autotune
    from pallas_kernels import flash_mosaic

    tuned = dataclasses.replace(
        flash_mosaic.default_config(64, causal=False),
        schedule_barrier=True, named_barrier=True, softmax_overlap=False,
    )  # fmt: skip
    asked, given = [], []
    monkeypatch.setattr(
        autotune, "lookup_call", lambda *args, **kw: asked.append((args[0], kw)) or tuned
    )
    kernel = flash_mosaic.flex_attention

    def recording(*args, config=None, **kwargs):
        given.append(config)
        return kernel(*args, config=config, **kwargs)

    monkeypatch.setattr(flash_mosaic, "flex_attention", recording)
    shape = (1, 70, 90, 2, 1, 64)
    q, k, v = make_inputs(rng, shape, jnp.bfloat16)
    slopes = np.asarray([0.5, 0.25])  # 2 ** -(h + 1): from h, no closed-over array

    def alibi(s, b, h, qi, kj):
        return s - jnp.exp2(-(h + 1).astype(jnp.float32)) * jnp.abs(qi - kj).astype(jnp.float32)

    out = jattn.flex_attention(q, k, v, score_mod=alibi, implementation="mosaic")
    assert asked == [("mosaic", dict(causal=False))] and given == [tuned]
    i, j = np.arange(70)[:, None], np.arange(90)[None, :]
    bias = -slopes[None, :, None, None] * np.abs(i - j)
    want = oracle.attention(*(_wide(x) for x in (q, k, v)), np.broadcast_to(bias, (1, 2, 70, 90)))
    assert_close(out, want[0], TOLERANCE[jnp.bfloat16])
    mine = flash_mosaic.default_config(64, causal=False)
    jattn.flex_attention(q, k, v, score_mod=alibi, implementation="mosaic", config=mine)
    assert len(asked) == 1 and given[-1] == mine


def test_mosaic_flex_serves_the_h64_table_entrys_wide_tiles(rng, monkeypatch):
    """The H200 table's H = 64 entry up to 1k tokens has 128-row programs forward and backward
    (block_q and bwd_block_q 128), wider than default_config's: flex on Mosaic takes it for
    config=None (without a block mask, whose blocks fix 64-row programs); ALiBi under a window
    mask_mod against the float64 oracle with gradients."""
    from jattn import autotune

    wide = dataclasses.replace(jattn.MosaicConfig(), block_q=128, bwd_block_q=128, bwd_num_stages=3)
    monkeypatch.setattr(autotune, "lookup_call", lambda *args, **kw: wide)
    q, k, v = make_inputs(rng, (1, 150, 170, 2, 1, 64), jnp.bfloat16)
    i, j = np.arange(150)[:, None], np.arange(170)[None, :]

    def alibi(s, b, h, qi, kj):
        return s - jnp.exp2(-(h + 1).astype(jnp.float32)) * jnp.abs(qi - kj).astype(jnp.float32)

    window = lambda b, h, qi, kj: jnp.abs(qi - kj) <= 40  # noqa: E731
    bias = -np.asarray([0.5, 0.25])[None, :, None, None] * np.abs(i - j)

    def run(q, k, v):
        return jattn.flex_attention(q, k, v, score_mod=alibi, mask_mod=window,
                                    return_residual=True, implementation="mosaic")  # fmt: skip

    _matches_oracle(rng, run, q, k, v, bias, (np.abs(i - j) <= 40)[None, None])


def test_mosaic_flex_lowers_for_cuda(rng, monkeypatch):
    """The GPU path of the Mosaic flex forward (block list in shared memory, mods over WGMMA
    tiles) lowers to Mosaic GPU for CUDA on this machine, and so does its backward, with a
    block mask's lists and without, and with closed-over document ids read per row and key."""
    from jax import export

    from pallas_kernels import flash_mosaic

    monkeypatch.setattr(flash_mosaic.common, "interpret_mode", lambda: False)
    shape = (1, 256, 384, 2, 1, 128)
    score_mod, mask_mod, _, _ = _mosaic_case("causal_block_mask_with_alibi", shape)
    block_mask = jattn.create_block_mask(mask_mod, None, None, 256, 384)
    spec = jax.ShapeDtypeStruct
    window = _mosaic_case("window_mask_mod", shape)[1]
    ids = jnp.arange(384, dtype=jnp.int32) // 100  # read per query row and per key
    same_doc = lambda b, h, qi, kj: ids[qi] == ids[kj]  # noqa: E731
    calls = {
        "the block mask's lists": dict(score_mod=score_mod, block_mask=block_mask),
        "no block mask, mods in every tile": dict(score_mod=score_mod, mask_mod=window),
        "closed-over ids": dict(
            mask_mod=same_doc,
            block_mask=jattn.create_block_mask(same_doc, None, None, 256, 384),
        ),
    }
    args = [spec((1, 256, 2, 128), jnp.bfloat16), spec((1, 384, 1, 128), jnp.bfloat16)]
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")  # named if it ran
    for name, mods in calls.items():

        def loss(q, k, v, mods=mods):
            out = jattn.flex_attention(q, k, v, implementation="mosaic", **mods)
            return out.astype(jnp.float32).sum()

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        text = export.export(grads, platforms=["cuda"], disabled_checks=[triton])(
            args[0], args[1], args[1]
        ).mlir_module()
        assert text.count("mosaic_gpu_v2") == 3, f"{name}: forward, dq and dk/dv"
        assert "triton" not in text, name


def test_mosaic_forward_visits_block_mask_lists_longest_first():
    """The forward's lists (`flash_mosaic._visit_lists(forward=True)`): each row names its
    query block, partial key blocks before full ones; with longest_first the rows are ordered by
    visit count, descending, ties in query order (a causal mask: the last query block first),
    as MosaicConfig.longest_first orders the native causal forward."""
    from pallas_kernels.flash_mosaic import _visit_lists

    causal = lambda b, h, qi, kj: qi >= kj  # noqa: E731
    block_mask = jattn.create_block_mask(causal, None, None, 384, 384)  # 3 blocks of 128
    for longest_first, order in [(False, [0, 1, 2]), (True, [2, 1, 0])]:
        lists = np.asarray(
            _visit_lists(block_mask.kv_blocks, forward=True, longest_first=longest_first)
        )[0, 0]
        assert lists.shape == (3, 32)
        np.testing.assert_array_equal(lists[:, 2], order)  # the rows' query blocks
        for row in lists:  # query block q: q + 1 visits, the diagonal one partial (listed first)
            q = row[2]
            assert (row[0], row[1]) == (q + 1, 1)
            assert row[3] == q and sorted(row[3 : 3 + q + 1]) == list(range(q + 1))
    docs = np.repeat([0, 0, 1], 128)  # query blocks 0, 1: 2 visits; block 2: 1; ties keep order
    same = lambda b, h, qi, kj: jnp.asarray(docs)[qi] == jnp.asarray(docs)[kj]  # noqa: E731
    lists = _visit_lists(
        jattn.create_block_mask(same, None, None, 384, 384).kv_blocks,
        forward=True,
        longest_first=True,
    )
    np.testing.assert_array_equal(np.asarray(lists)[0, 0, :, 2], [0, 1, 2])


def test_mosaic_flex_kernels_leave_no_unused_index_vector(monkeypatch):
    """The Mosaic flex kernels traced for the GPU (forward, dq, dk/dv) compute a tile's q_idx
    and kv_idx vectors, and load its segment channels, only where a mod reads them; a mod's
    unread values (a gather's index wrapping) are not computed: unused 1-D values left in a
    kernel made JAX 0.11's Mosaic GPU layout search fail on the H200 (a block mask's full tiles
    under a mask_mod alone)."""
    from jax.extend.core import jaxprs_in_params

    from pallas_kernels import flash_mosaic

    monkeypatch.setattr(flash_mosaic.common, "interpret_mode", lambda: False)
    ids = jnp.arange(256, dtype=jnp.int32) // 100
    alibi = lambda s, b, h, qi, kj: s - 0.1 * jnp.abs(qi - kj).astype(jnp.float32)  # noqa: E731
    same_doc = lambda b, h, qi, kj: ids[qi] == ids[kj]  # noqa: E731
    calls = {  # (score_mod, mask_mod)
        "causal": (None, lambda b, h, qi, kj: qi >= kj),
        "closed-over ids": (None, same_doc),
        "closed-over ids, ALiBi (reads no id)": (alibi, same_doc),
    }

    def unused_vectors(jaxpr, found, in_kernel=False):
        read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
        for eqn in jaxpr.eqns:
            unused = eqn.outvars and not any(id(v) in read for v in eqn.outvars)
            if in_kernel and unused and not eqn.effects and len(eqn.outvars[0].aval.shape) == 1:
                found.append(eqn)
            kernel = in_kernel or eqn.primitive.name in ("pallas_call", "mpmd_map")
            for sub in jaxprs_in_params(eqn.params):
                unused_vectors(getattr(sub, "jaxpr", sub), found, kernel)
        return found

    spec = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    for name, (score_mod, mask_mod) in calls.items():
        mods = dict(
            score_mod=score_mod,
            mask_mod=mask_mod,
            block_mask=jattn.create_block_mask(mask_mod, None, None, 256, 256),
        )

        def loss(q, k, v, mods=mods):
            out = jattn.flex_attention(q, k, v, implementation="mosaic", **mods)
            return out.astype(jnp.float32).sum()

        closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(spec, spec, spec)
        assert not unused_vectors(closed.jaxpr, []), name


@pytest.mark.parametrize("head_dim, fused_dq", [(128, False), (128, True), (256, False)])
def test_mosaic_flex_kernels_give_run_state_no_literal_operand(
    rng, head_dim, fused_dq, monkeypatch
):
    """The flex forward and backward under a block mask (lists read in every kernel), traced for
    the GPU: no wgmma's run_state takes a literal, which JAX 0.11's lowering rejects (see
    tests/test_flash_mosaic.py) and this machine's JAX 0.10 does not."""
    from pallas_kernels import flash_mosaic

    monkeypatch.setattr(flash_mosaic.common, "interpret_mode", lambda: False)
    shape = (1, 256, 384, 2, 1, head_dim)
    score_mod, mask_mod, _, _ = _mosaic_case("causal_block_mask_with_alibi", shape)
    block_mask = jattn.create_block_mask(mask_mod, None, None, 256, 384)
    config = dataclasses.replace(
        flash_mosaic.default_config(head_dim), bwd_fused_dq=fused_dq, bwd_dkdv_stages=None
    )

    def loss(q, k, v):
        out = jattn.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, implementation="mosaic",
            config=config,
        )  # fmt: skip
        return out.astype(jnp.float32).sum()

    q = jnp.zeros((1, 256, 2, head_dim), jnp.bfloat16)
    k = jnp.zeros((1, 384, 1, head_dim), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k).jaxpr
    assert run_state_literals(jaxpr) == []


def test_none_picks_mosaic_on_hopper_where_it_serves(rng, monkeypatch):
    """implementation=None on a Hopper GPU (faked here; shapes only): the Mosaic kernel for
    mods it serves without a block mask, the Triton kernel when it declines (a closed-over
    array), with a block mask or a TritonConfig, or before Hopper; XLA off the GPU and under
    forward-mode autodiff."""
    from jattn import attention, flex
    from pallas_kernels import common as kernel_common

    q, k, v = make_inputs(rng, MOSAIC_SHAPE, jnp.bfloat16)
    ran = []
    for name in ("_mosaic", "_triton", "_xla"):
        real = getattr(flex, name)

        def spy(*args, name=name, real=real, **kwargs):
            ran.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(flex, name, spy)

    def picked(jvp=False, **kwargs):
        ran.clear()
        f = lambda q, k, v: jattn.flex_attention(q, k, v, **kwargs)  # noqa: E731
        if jvp:
            jax.eval_shape(lambda *x: jax.jvp(f, x, x), q, k, v)
        else:
            jax.eval_shape(f, q, k, v)
        return ran[:]

    slopes = jnp.asarray([0.5, 0.25])
    closed = lambda s, b, h, qi, kj: s - slopes[h] * jnp.abs(qi - kj)  # noqa: E731
    alibi = lambda s, b, h, qi, kj: s - jnp.exp2(-1.0 - h) * jnp.abs(qi - kj)  # noqa: E731
    causal = lambda b, h, qi, kj: kj <= qi  # noqa: E731
    blocks = jattn.create_block_mask(causal, None, None, 150, 330)
    assert picked(score_mod=alibi) == ["_xla"]  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "hopper_or_newer", lambda: True)
    monkeypatch.setattr(kernel_common, "interpret_mode", lambda: True)
    assert picked(score_mod=alibi) == ["_mosaic"]
    assert picked(score_mod=closed) == ["_mosaic", "_triton"]  # declined at trace time
    assert picked(score_mod=alibi, block_mask=blocks) == ["_mosaic"]
    small = jattn.create_block_mask(causal, None, None, 150, 330, block_q=64, block_kv=64)
    assert picked(score_mod=alibi, block_mask=small) == ["_mosaic", "_triton"]  # 64-row blocks
    assert picked(score_mod=alibi, config=SMALL) == ["_triton"]
    assert picked(jvp=True, score_mod=alibi) == ["_xla"]
    monkeypatch.setattr(attention, "hopper_or_newer", lambda: False)
    assert picked(score_mod=alibi) == ["_triton"]


@pytest.mark.parametrize("transposed", [False, True])
def test_mosaic_mods_run_on_index_vectors_until_they_meet(rng, transposed):
    """`mod_tiles.over_tile`: a mod over a tile equals the mod applied per element; what
    depends on one index is computed on its vector (the jaxpr has no full-tile iota or clamp,
    and no [bq, 1] / [1, bk] shape, which Mosaic GPU cannot lay out), and a jnp helper's jit,
    a mask_mod of one index or of none still gives a whole tile. Index arithmetic that ends in
    a float (ALiBi's |q - kv|) has no int -> float conversion of a whole tile where the indices'
    bound makes float32 exact, and keeps it where a literal breaks that bound."""
    from pallas_kernels import mod_tiles

    q_idx = jnp.arange(64, dtype=jnp.int32) + 37
    k_idx = jnp.arange(128, dtype=jnp.int32)
    i, j = np.asarray(q_idx)[:, None], np.asarray(k_idx)[None, :]
    scores = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    tile = scores.T if transposed else scores

    def alibi(s, q, k):
        return s - jnp.exp2(-1.5) * jnp.abs(jnp.clip(q, 0, 80) - k).astype(jnp.float32)

    def both_uses(s, q, k):  # q - k compared as an int and converted to a float
        return jnp.where(q - k <= 40, s + (q - k).astype(jnp.float32), s)

    def far(s, q, k):  # 2**25 + q - k: float32 rounds it, as it rounds the int's conversion
        return s + (jnp.abs(k - q) + 2**25).astype(jnp.float32)

    mods = {  # name: (mod, tiles, want, int -> float conversions of a whole tile)
        "alibi": (alibi, (tile,), scores - 2**-1.5 * np.abs(np.clip(i, 0, 80) - j), 0),
        "both uses": (both_uses, (tile,), np.where(i - j <= 40, scores + (i - j), scores), 0),
        "far": (far, (tile,), scores + (np.abs(j - i) + 2**25).astype(np.float32), 1),
        "window": (lambda q, k: jnp.abs(q - k) <= 40, (), np.abs(i - j) <= 40, 0),
        "keys only": (lambda q, k: k % 3 == 0, (), np.broadcast_to(j % 3 == 0, (64, 128)), 0),
        "constant": (lambda q, k: True, (), np.ones((64, 128), bool), 0),
        "where": (lambda q, k: jnp.where(q > 50, k <= q, False), (), (i > 50) & (j <= i), 0),
    }
    for name, (fn, tiles, want, conversions) in mods.items():
        want = want.T if transposed else want
        for bound in (200, None):
            run = lambda *t, fn=fn, bound=bound: mod_tiles.over_tile(  # noqa: E731
                fn, q_idx, k_idx, *t, transposed=transposed, index_bound=bound
            )
            got = np.asarray(run(*tiles))
            assert got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, err_msg=name)
            converted = 0
            for eqn in jax.make_jaxpr(run)(*tiles).eqns:
                shapes = [getattr(v.aval, "shape", ()) for v in (*eqn.invars, *eqn.outvars)]
                assert not any(1 in shape for shape in shapes), (name, eqn)
                if eqn.primitive.name in ("iota", "clamp"):
                    assert all(len(shape) < 2 for shape in shapes), (name, eqn)
                if eqn.primitive.name == "convert_element_type" and len(shapes[0]) == 2:
                    converted += jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.integer) and (
                        jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)
                    )
            unbounded = name in ("alibi", "both uses")  # an index bound is what makes it exact
            assert converted == conversions + (bound is None and unbounded), (name, bound)


def test_mosaic_mods_fold_the_softmax_scale_and_log2e_into_their_scalars(rng):
    """`over_tile(..., tile_scales=(scale,), out_scale=log2 e)` equals log2 e * mod(scale * s)
    per element, for mods that fold and mods that do not. ALiBi's folds: its tile takes the index
    difference, q.k times one factor and |q - kv| times another, added (an FMA on the GPU),
    where scaling q.k, the slope's multiply, the subtraction and the base-2 change took four."""
    from pallas_kernels import mod_tiles

    q_idx, k_idx = jnp.arange(64, dtype=jnp.int32) + 5, jnp.arange(128, dtype=jnp.int32)
    i, j = np.asarray(q_idx)[:, None], np.asarray(k_idx)[None, :]
    scores = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    s, scale, out = np.asarray(scores, np.float64), 0.125, 1.4426950408889634
    slope = jnp.float32(0.3)
    mods = {  # name: (mod, want as a function of the scaled score, tile arithmetic at most)
        "alibi": (
            lambda x, q, k: x - slope * jnp.abs(q - k).astype(jnp.float32),
            lambda x: x - 0.3 * np.abs(i - j),
            4,  # q - kv, q.k * factor, |q - kv| * factor, + (five without the fold)
        ),
        "soft cap": (lambda x, q, k: 30.0 * jnp.tanh(x / 30.0), lambda x: 30 * np.tanh(x / 30), 2),
        "identity": (lambda x, q, k: x, lambda x: x, 1),
        "negated sum": (
            lambda x, q, k: -(x + 2.0 * x) / 4.0 + k.astype(jnp.float32),
            lambda x: -(3 * x) / 4 + j,
            4,
        ),
        "where": (
            lambda x, q, k: jnp.where(q >= k, x * 2.0, -x),
            lambda x: np.where(i >= j, 2 * x, -x),
            3,
        ),
        "index sum": (  # affine index chain: a row term and a column term, no index tile
            lambda x, q, k: x + 0.5 * (k - q + 5).astype(jnp.float32),
            lambda x: x + 0.5 * (j - i + 5),
            4,
        ),
        "divided by zero": (  # stays a division: 1 / 0 is no factor
            lambda x, q, k: x / 0.0,
            lambda x: np.where(x > 0, np.inf, -np.inf),
            3,
        ),
    }
    arithmetic = {"mul", "add", "sub", "div", "neg"}
    for name, (mod, want, most) in mods.items():

        def run(t, mod=mod):
            return mod_tiles.over_tile(
                mod, q_idx, k_idx, t, index_bound=200, tile_scales=(scale,), out_scale=out
            )

        got, expected = np.asarray(run(scores)), out * want(scale * s)
        # the index sum adds a row term and a column term of up to ~100 whose sum may be near
        # 0: a few float32 ulps of the terms
        atol = 4 * np.finfo(np.float32).eps * 100 if name == "index sum" else 2e-6
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=atol, err_msg=name)
        ops = [
            e.primitive.name
            for e in jax.make_jaxpr(run)(scores).eqns
            if e.primitive.name in arithmetic and len(e.outvars[0].aval.shape) == 2
        ]
        assert len(ops) <= most, (name, ops)


@pytest.mark.parametrize(
    "case",
    [
        # with ALiBi from h beside the ids: each part is a case of its own here, the two
        # together run at real size on the GPU (22 s interpreted)
        pytest.param("documents_from_ids", marks=pytest.mark.slow),
        "documents_from_ids_alone",  # unmasked tiles load no ids (JAX 0.11's layout search)
        # a read at b alone (-m slow): streamed as the ids above are; on the GPU at real size
        pytest.param("prefix_lm_per_batch", marks=pytest.mark.slow),
    ],
)
def test_mosaic_flex_reads_closed_over_arrays_per_row_and_key(rng, case, monkeypatch):
    """Mods that read closed-over arrays at b and q_idx, b and kv_idx, or b alone (document
    ids, a prefix length per sequence) run on the Mosaic kernels: the reads are computed per
    query row and per key outside them (`jattn.flex._mosaic_vectors`) and streamed as segment
    ids are, forward and backward (the Triton backward must not run). Against the float64
    oracle with gradients; the documents alone and with ALiBi from h, T != S, 2 sequences
    (GQA 2 where ALiBi reads h; one head otherwise: GQA is in the cases above and on the GPU)."""
    _forbid_triton_backward(monkeypatch)
    heads = 2 if case == "documents_from_ids" else 1
    _check_closed_over_reads(rng, case, (2, 100, 160, heads, 1, 64))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", ["documents_from_ids", "documents_from_ids_alone", "prefix_lm_per_batch"]
)
def test_mosaic_flex_reads_closed_over_arrays_real_size_on_gpu(rng, case, monkeypatch):
    """The same compiled on Hopper at real lengths: 1000 query rows, 1300 keys, GQA 2, H 128.
    The mask_mod alone under a block mask failed JAX 0.11's layout search while its kernels
    computed values nothing read (stop 28); it compiles and matches since (stop 29)."""
    _forbid_triton_backward(monkeypatch)
    _check_closed_over_reads(rng, case, (2, 1000, 1300, 4, 2, 128))


def _check_closed_over_reads(rng, case, shape):
    batch, q_len, kv_len, heads = shape[:4]
    q, k, v = make_inputs(rng, shape, jnp.bfloat16)
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    score_mod, bias, block_mask = None, None, None
    if case.startswith("documents_from_ids"):
        q_docs = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1)
        kv_docs = np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1)
        q_ids, kv_ids = jnp.asarray(q_docs, jnp.int32), jnp.asarray(kv_docs, jnp.int32)
        mask_mod = lambda b, h, qi, kj: q_ids[b, qi] == kv_ids[b, kj]  # noqa: E731
        visible = q_docs[:, None, :, None] == kv_docs[:, None, None, :]
        score_mod = lambda s, b, h, qi, kj: s - jnp.exp2(-1.0 - h) * jnp.abs(qi - kj)  # noqa: E731
        slopes = 2.0 ** -(1.0 + np.arange(heads))
        bias = -slopes[None, :, None, None] * np.abs(i - j)
        block_mask = jattn.create_block_mask(mask_mod, batch, None, q_len, kv_len)
        if case.endswith("_alone"):  # the mask_mod alone: the case JAX 0.11 has declined
            score_mod = bias = None
    else:
        prefix = jnp.asarray([30, 0], jnp.int32)  # sequence 1: causal only
        mask_mod = lambda b, h, qi, kj: (kj < prefix[b]) | (kj <= qi)  # noqa: E731
        visible = (j[None] < np.asarray(prefix)[:, None, None]) | (j <= i)[None]
        visible = visible[:, None]

    def run(q, k, v):
        return jattn.flex_attention(
            q, k, v, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
            return_residual=True, implementation="mosaic",
        )  # fmt: skip

    _matches_oracle(rng, run, q, k, v, bias, visible)


def test_mosaic_flex_declines_array_reads_it_cannot_stream(rng):
    """What the Mosaic kernels cannot take as one value per query row and one per key: a read
    indexed by h, or by both q_idx and kv_idx, a float value, two values per row. None falls
    through to the Triton kernel there."""
    q, k, v = make_inputs(rng, MOSAIC_SHAPE, jnp.bfloat16)
    slopes = jnp.asarray([0.5, 0.25])
    table = jnp.arange(400, dtype=jnp.int32)
    ids = jnp.arange(400, dtype=jnp.int32) // 100
    weight = jnp.linspace(0.0, 1.0, 400)
    mods = {
        "not h": dict(score_mod=lambda s, b, h, qi, kj: s - slopes[h] * jnp.abs(qi - kj)),
        "not both": dict(mask_mod=lambda b, h, qi, kj: table[jnp.abs(qi - kj)] < 50),
        "integer or bool": dict(score_mod=lambda s, b, h, qi, kj: s + weight[kj]),
        "one value per query row": dict(
            mask_mod=lambda b, h, qi, kj: (ids[qi] == ids[kj]) & (table[qi] >= kj)
        ),
    }
    for message, kwargs in mods.items():
        with pytest.raises(NotImplementedError, match=f"{message}.*'triton'"):
            jattn.flex_attention(q, k, v, implementation="mosaic", **kwargs)


def test_mosaic_backward_skips_the_slope_of_a_score_mod_that_only_adds(rng):
    """`mosaic_common.flex_logits`: d score_mod / d score is None (1, no multiply per element)
    for a score_mod that adds to the score (ALiBi), and a tile for one that scales it, equal to
    JAX's derivative."""
    import types

    from pallas_kernels import mosaic_common
    from pallas_kernels.flash_triton import FlexSpec

    qk = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    q_idx, k_idx = jnp.arange(64, dtype=jnp.int32), jnp.arange(128, dtype=jnp.int32)
    mods = {
        "alibi": lambda s, b, h, qi, kj: s - jnp.exp2(-1.0 - h) * jnp.abs(qi - kj),
        "soft cap": lambda s, b, h, qi, kj: 30.0 * jnp.tanh(s / 30.0),
    }
    for name, mod in mods.items():
        flex = FlexSpec(mod, None, 0, (), None)
        st = types.SimpleNamespace(flex=flex, scale=0.5, interpret=True, flex_index_bound=128)
        logits, slope = mosaic_common.flex_logits(st, qk, 0, 1, q_idx, k_idx)
        want = jax.vmap(jax.vmap(lambda s, q, k, mod=mod: mod(s, 0, 1, q, k)))(
            0.5 * qk, *jnp.meshgrid(q_idx, k_idx, indexing="ij")
        )
        np.testing.assert_allclose(logits, want * np.log2(np.e), rtol=1e-5, atol=1e-5)
        if name == "alibi":
            assert slope is None
        else:
            np.testing.assert_allclose(slope, 1.0 - np.tanh(0.5 * qk / 30.0) ** 2, rtol=1e-5)
