"""What a query cannot see never reaches it: NaN/inf in hidden keys, on every implementation.

A KV cache's unused slots are uninitialised memory in real serving; masked keys must be absent,
not weight-0 terms (0 * NaN = NaN). Each test poisons the hidden keys and compares the result and
the gradients with the same call on clean inputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jattn
from jattn import offload
from pallas_kernels import flash_mosaic

from cases import GRAD_TOLERANCE, TOLERANCE, assert_close, make_inputs

IMPLEMENTATIONS = {
    "xla": None,
    "xla_chunked": jattn.ChunkedConfig(block_q=4, block_k=8),
    "triton": jattn.TritonConfig(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16),
    None: None,  # auto
}
POISONS = (jnp.nan, jnp.inf, -jnp.inf)


def _grads(loss, *args):
    return jax.grad(loss, argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_key_lengths_hide_nan_and_inf(rng, implementation):
    """NaN/inf past key_value_seq_lengths (and in the padding of the last key block): the output,
    dq, and dk/dv of every visible key equal those of the same call on clean inputs."""
    q, k, v = make_inputs(rng, (2, 6, 20, 4, 2, 16))
    lengths = jnp.array([5, 7], jnp.int32)
    hidden = (jnp.arange(20)[None, :] >= lengths[:, None])[:, :, None, None]  # [B, S, 1, 1]
    poison = jnp.asarray(rng.choice(POISONS, size=k.shape), jnp.float32)
    bad_k, bad_v = (jnp.where(hidden, poison, x) for x in (k, v))
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    options = dict(
        key_value_seq_lengths=lengths,
        implementation=implementation,
        config=IMPLEMENTATIONS[implementation],
    )

    def loss(q, k, v):
        return jnp.sum(jattn.dot_product_attention(q, k, v, **options) * cotangent)

    want = jattn.dot_product_attention(q, k, v, **options)
    got = jattn.dot_product_attention(q, bad_k, bad_v, **options)
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])
    want_grads = _grads(loss, q, k, v)
    got_grads = _grads(loss, q, bad_k, bad_v)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        if name != "q":  # hidden keys: any gradient; visible ones: exact
            g, w = jnp.where(hidden, 0.0, g), jnp.where(hidden, 0.0, w)
        assert bool(jnp.isfinite(g).all()), f"d{name} not finite"
        assert_close(g, np.asarray(w, np.float64), GRAD_TOLERANCE[jnp.float32])


def _check_masked_key_with_nan(rng, feature, options, dtype=jnp.float32, shape=None):
    """k = NaN and v = inf in one key: the rows that see it get NaN output and lse; every other
    row's output, lse and dq equal the clean call's, and so do dk/dv of the keys that only those
    rows see (a key that a NaN row sees gets a NaN gradient, as under plain autodiff)."""
    shape = shape or (1, 24, 24, 2, 1, 16)
    size = shape[1]
    nan_key = 17 * size // 24  # 17 of 24: past the middle (segments) and off the first tile
    q, k, v = make_inputs(rng, shape, dtype)
    i, j = np.arange(size)[:, None], np.arange(size)[None, :]
    options = dict(options)
    if feature == "causal":
        options["is_causal"] = True
        visible = j <= i
    elif feature == "window":
        options["local_window_size"] = (2, 1)
        visible = (j >= i - 2) & (j <= i + 1)
    elif feature == "segments":
        ids = (np.arange(size) >= size // 2).astype(np.int32)
        options["segment_ids"] = (jnp.asarray(ids)[None], jnp.asarray(ids)[None])
        visible = ids[:, None] == ids[None, :]
    else:
        visible = rng.random((size, size)) < 0.3
        options["mask"] = jnp.asarray(visible)[None, None]
    sees_nan = visible[:, nan_key]  # [T]
    clean_keys = ~visible[sees_nan].any(axis=0)  # [S]: no NaN row sees them
    assert sees_nan.any() and not sees_nan.all()  # causal: every key is seen by a NaN row
    rows = jnp.asarray(~sees_nan)[None, :, None]  # [1, T, 1]
    bad_k, bad_v = k.at[:, nan_key].set(jnp.nan), v.at[:, nan_key].set(jnp.inf)

    def run(q, k, v):
        return jattn.dot_product_attention(q, k, v, return_residual=True, **options)

    want_out, want_lse = run(q, k, v)
    got_out, got_lse = run(q, bad_k, bad_v)
    assert bool(jnp.isnan(got_lse[:, sees_nan]).all())
    assert bool((~jnp.isfinite(got_out[:, sees_nan])).any(axis=-1).all())
    clean_rows = lambda x: jnp.where(rows if x.ndim == 3 else rows[..., None], x, 0.0)
    assert_close(clean_rows(got_out), np.asarray(clean_rows(want_out)), TOLERANCE[dtype])
    assert_close(clean_rows(got_lse), np.asarray(clean_rows(want_lse)), TOLERANCE[dtype])
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(clean_rows(run(q, k, v)[0]) * cotangent)

    want_grads = _grads(loss, q, k, v)
    got_grads = _grads(loss, q, bad_k, bad_v)
    keys = jnp.asarray(clean_keys)[None, :, None, None]
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        g, w = (clean_rows(x) if name == "q" else jnp.where(keys, x, 0.0) for x in (g, w))
        assert bool(jnp.isfinite(g).all()), f"d{name} not finite"
        assert_close(g, np.asarray(w, np.float64), GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked", "triton"])
@pytest.mark.parametrize("feature", ["causal", "window", "segments", "mask"])
def test_masked_key_with_nan_reaches_only_rows_that_see_it(rng, implementation, feature):
    options = dict(implementation=implementation, config=IMPLEMENTATIONS[implementation])
    _check_masked_key_with_nan(rng, feature, options)


@pytest.mark.parametrize(
    "feature, fused_dq",
    [
        # the producers' cleaning on causal documents runs by default in
        # test_mosaic_cleans_the_batch_rows_whose_values_are_not_finite
        pytest.param("causal", False, marks=pytest.mark.slow),
        ("segments", True),
        # the same two paths (a causal or window reach; dense masks) in other kernels' modes
        pytest.param("window", True, marks=pytest.mark.slow),
        pytest.param("mask", False, marks=pytest.mark.slow),
    ],
)
def test_mosaic_masked_key_with_nan_reaches_only_rows_that_see_it(rng, feature, fused_dq):
    """The Mosaic kernels (interpret mode): the producer cleans the masked tiles' K and V
    (`mosaic_common.clean_tile`) before the consumers multiply a hidden key by 0; the fused-dQ
    backward cleans its keys' tiles itself."""
    config = jattn.MosaicConfig(
        block_q=64,
        block_kv=64,
        num_stages=2,
        bwd_fused_dq=fused_dq,
        redo_hidden=False,  # the producers' cleaning (the redo: below)
        bwd_redo_hidden=False,
    )
    options = dict(implementation="mosaic", config=config)
    _check_masked_key_with_nan(rng, feature, options, jnp.bfloat16, shape=(1, 24, 24, 1, 1, 64))


@pytest.mark.parametrize(
    "feature, persistent",
    [
        # the redo on causal documents runs by default in
        # test_mosaic_redo_hidden_redoes_only_programs_whose_rows_went_non_finite
        pytest.param("causal", False, marks=pytest.mark.slow),
        # dense masks (every tile masked)
        pytest.param("segments", False, marks=pytest.mark.slow),
        # a persistent program's tiles (two each), the softmax overlap, O's own buffer (80 s)
        pytest.param("causal", True, marks=pytest.mark.slow),
    ],
)
def test_mosaic_redo_hidden_masked_key_with_nan(rng, feature, persistent):
    """MosaicConfig.redo_hidden and bwd_redo_hidden: no flag read, no cleaning on the first
    pass; a consumer (of the forward, of the dq kernel) whose rows went non-finite computes its
    tiles again, loading and cleaning each K, V tile itself. The same results as the cleaning
    producer's (a redo that never ran fails this: NaN output or dq in rows that see no NaN)."""
    config = jattn.MosaicConfig(
        block_q=64,
        block_kv=64,
        num_stages=2,
        persistent=persistent,
        softmax_overlap=persistent,
        redo_hidden=True,
        bwd_redo_hidden=True,
    )
    options = dict(implementation="mosaic", config=config)
    shape = (1, 160, 160, 2, 1, 64) if persistent else (1, 24, 24, 1, 1, 64)
    _check_masked_key_with_nan(rng, feature, options, jnp.bfloat16, shape=shape)


def test_mosaic_cleans_the_batch_rows_whose_values_are_not_finite(rng):
    """The Mosaic kernels clean masked tiles only in the batch rows whose V (forward) or K and V
    (backward) hold a NaN or an inf (`mosaic_common.flag_nonfinite`, a column of the kernels'
    bounds), before the consumers multiply a hidden key by 0 (`mosaic_common.clean_tile`): a
    NaN key with an inf value in row 1's second causal document leaves row 0 and row 1's first
    document exactly as on clean inputs (output, lse, dq; dk and dv of the keys no NaN row
    sees) and makes row 1's second document NaN."""
    config = jattn.MosaicConfig(
        block_q=64, block_kv=64, num_stages=2, redo_hidden=False, bwd_redo_hidden=False
    )
    _check_cleaned_rows(rng, config)


@pytest.mark.parametrize(
    "forward_redo",
    # the dq kernel's redo behind the forward's cleaning: also in the default run, at H = 64's
    # defaults, by test_rows_past_query_lengths_see_no_nan_value
    [True, pytest.param(False, marks=pytest.mark.slow)],
)
def test_mosaic_redo_hidden_redoes_only_programs_whose_rows_went_non_finite(rng, forward_redo):
    """The same with redo_hidden (or the forward's cleaning) and bwd_redo_hidden: row 0's
    programs keep their first pass, row 1's redo; results exactly the cleaning's."""
    config = jattn.MosaicConfig(
        block_q=64, block_kv=64, num_stages=2, redo_hidden=forward_redo, bwd_redo_hidden=True
    )
    _check_cleaned_rows(rng, config)


def _check_cleaned_rows(rng, config):
    q, k, v = make_inputs(rng, (2, 24, 24, 1, 1, 64), jnp.bfloat16)
    ids = jnp.asarray(np.tile(np.arange(24) >= 12, (2, 1)), jnp.int32)
    options = dict(implementation="mosaic", config=config, segment_ids=(ids, ids), is_causal=True)
    clean = jnp.arange(24)[None, :] < jnp.array([[24], [12]])  # [B, T]: rows (keys) no NaN meets
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def run(q, k, v):
        return jattn.dot_product_attention(q, k, v, return_residual=True, **options)

    def loss(q, k, v):  # (the clean rows' loss, (output, lse))
        out, lse = run(q, k, v)
        out = out.astype(jnp.float32)
        return jnp.sum(jnp.where(clean[..., None, None], out * cotangent, 0.0)), (out, lse)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, (want, want_lse)), want_grads = grad(q, k, v)
    # key 12 opens row 1's second document: every row of that document sees it
    (_, (got, got_lse)), got_grads = grad(q, k.at[1, 12].set(jnp.nan), v.at[1, 12].set(jnp.inf))
    keep = lambda x: np.where(np.asarray(clean).reshape(2, 24, *[1] * (x.ndim - 2)), x, 0)
    np.testing.assert_array_equal(keep(np.asarray(got)), keep(np.asarray(want)))
    np.testing.assert_array_equal(keep(np.asarray(got_lse)), keep(np.asarray(want_lse)))
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        g, w = (keep(np.asarray(x, np.float32)) for x in (g, w))
        assert np.isfinite(g).all(), f"d{name} not finite"
        if name == "q":
            np.testing.assert_array_equal(g, w)
        else:  # the keys only clean rows see
            assert_close(g, w.astype(np.float64), GRAD_TOLERANCE[jnp.bfloat16])
    assert bool(jnp.isnan(got_lse[1, 12:]).all())
    assert bool(jnp.isnan(got[1, 12:]).any(axis=-1).all())


def test_flag_nonfinite_marks_only_the_batch_rows_with_nan_or_inf(rng):
    """`flag_nonfinite` sets the bounds' NONFINITE column where a batch row of any array holds
    a NaN, +inf or -inf, leaves the other columns, and does nothing where no tile is cleaned."""
    from types import SimpleNamespace

    from pallas_kernels import mosaic_common

    bounds = jnp.asarray(rng.integers(0, 9, (5, 4)), jnp.int32).at[:, 3].set(0)
    k, v = (jnp.asarray(rng.standard_normal((5, 7, 2, 3)), jnp.bfloat16) for _ in range(2))
    k = k.at[1, 6, 1, 2].set(jnp.inf)
    v = v.at[3, 0, 0, 0].set(-jnp.inf).at[4, 2, 1, 1].set(jnp.nan)
    flagged = mosaic_common.flag_nonfinite(SimpleNamespace(clean_hidden=True), bounds, k, v)
    np.testing.assert_array_equal(flagged[:, 3], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(flagged[:, :3], bounds[:, :3])
    only_v = mosaic_common.flag_nonfinite(SimpleNamespace(clean_hidden=True), bounds, v)
    np.testing.assert_array_equal(only_v[:, 3], [0, 0, 0, 1, 1])
    unused = mosaic_common.flag_nonfinite(SimpleNamespace(clean_hidden=False), bounds, k, v)
    np.testing.assert_array_equal(unused, bounds)
    # the backward adds K's flag to the forward's of V: flagged rows stay flagged
    then_k = mosaic_common.flag_nonfinite(SimpleNamespace(clean_hidden=True), only_v, k)
    np.testing.assert_array_equal(then_k, flagged)


@pytest.mark.parametrize("implementation", ["xla", "triton", "mosaic"])
def test_rows_past_query_lengths_see_no_nan_value(rng, implementation):
    """A NaN value in a key that every real row sees: those rows are NaN, and the rows past
    `query_seq_lengths`, which see no key, give 0 output, -inf lse and 0 dq (on Mosaic the
    producer cleans the tiles of a program with such rows: `mosaic_common.hides_keys`)."""
    dtype = jnp.bfloat16 if implementation == "mosaic" else jnp.float32
    mosaic = jattn.MosaicConfig(block_q=64, block_kv=64)
    config = mosaic if implementation == "mosaic" else IMPLEMENTATIONS[implementation]
    q, k, v = make_inputs(rng, (1, 24, 24, 1, 1, 64), dtype)
    v = v.at[:, 3].set(jnp.nan)
    options = dict(query_seq_lengths=jnp.array([10]), implementation=implementation, config=config)

    def run(q):
        return jattn.dot_product_attention(q, k, v, return_residual=True, **options)

    out, lse = run(q)
    assert bool(jnp.isnan(out[:, :10]).any(axis=-1).all())
    np.testing.assert_array_equal(np.asarray(out[:, 10:], np.float32), 0.0)
    assert bool((lse[:, 10:] == -jnp.inf).all())
    dq = jax.grad(lambda q: jnp.sum(run(q)[0][:, 10:].astype(jnp.float32)))(q)
    np.testing.assert_array_equal(np.asarray(dq[:, 10:], np.float32), 0.0)  # a NaN row's dq:
    # unspecified (it sees the NaN key)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feature, fused_dq",
    [
        ("causal", False),
        ("window", False),
        ("segments", False),
        ("mask", False),
        ("mask", True),
        ("causal", True),
    ],
)
def test_gpu_mosaic_masked_key_with_nan(rng, feature, fused_dq):
    """The same on the GPU, compiled, with the default tiles: many tiles, the NaN key in a
    middle one, the producer's cleaning (`clean_tile`) racing nothing."""
    config = dataclasses.replace(  # 128-key tiles: a mask's [128, 256] tiles over 3 stages
        flash_mosaic.default_config(64),  # would not fit shared memory
        block_kv=128,
        num_stages=2,
        bwd_fused_dq=fused_dq,
        bwd_dkdv_stages=None,
        redo_hidden=False,  # the producers' cleaning (the redo: below)
        bwd_redo_hidden=False,
    )
    options = dict(implementation="mosaic", config=config)
    _check_masked_key_with_nan(rng, feature, options, jnp.bfloat16, shape=(1, 300, 300, 4, 2, 64))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feature, head_dim", [("causal", 64), ("segments", 64), ("window", 64), ("causal", 256)]
)
def test_gpu_mosaic_redo_hidden_masked_key_with_nan(rng, feature, head_dim):
    """MosaicConfig.redo_hidden and bwd_redo_hidden on the GPU (persistent, with the softmax
    overlap, as the H200's tuned causal configs): the consumers' own loads, cleaning and
    second pass (forward and dq kernel), compiled. At H = 256 the forward's redo alone (its
    default there; the dk/dv kernel splits the head dim and the dq kernel cleans)."""
    config = dataclasses.replace(
        flash_mosaic.default_config(head_dim),
        block_kv=128 if head_dim == 64 else 64,
        num_stages=2,
        persistent=head_dim <= 128,  # (the H200's causal H = 256 configs are not persistent)
        softmax_overlap=True,
        redo_hidden=True,
        bwd_redo_hidden=head_dim <= 128,
    )
    options = dict(implementation="mosaic", config=config)
    shape = (1, 300, 300, 4, 2, head_dim)
    _check_masked_key_with_nan(rng, feature, options, jnp.bfloat16, shape=shape)


def _decode_repro(paged: bool):
    """1 sequence, 2 pages of 4 slots, length 3, K = V = 1 in the valid slots, NaN elsewhere."""
    q = jnp.ones((1, 1, 4))
    if paged:  # page 2 in use; page 0 unused by anyone, page 1 the sequence's second page
        pool = jnp.full((3, 4, 1, 4), jnp.nan).at[2, :3].set(1.0)
        return q, pool, dict(page_table=jnp.array([[2, 1]], jnp.int32))
    return q, jnp.full((1, 8, 1, 4), jnp.nan).at[:, :3].set(1.0), {}


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("implementation", ["xla", "triton", None])
def test_decode_ignores_nan_past_lengths(implementation, paged):
    q, cache, extra = _decode_repro(paged)
    run = lambda q: jattn.decode_attention(
        q, cache, cache, jnp.array([3]), implementation=implementation, **extra
    )
    np.testing.assert_array_equal(np.asarray(run(q)), np.ones((1, 1, 4)))
    if implementation != "triton":  # the kernel has no backward; the XLA path does
        dq = jax.grad(lambda q: jnp.sum(run(q)))(q)
        np.testing.assert_array_equal(np.asarray(dq), np.zeros_like(q))


@pytest.mark.parametrize("shard_by", ["heads", "sequence"])
def test_sharded_decode_ignores_nan_past_lengths(rng, shard_by):
    devices = np.array(jax.devices()[:8])
    mesh = Mesh(devices[:4] if shard_by == "heads" else devices, ("attn",))
    q, k, v = make_inputs(rng, (2, 1, 32, 8, 4, 8))
    q = q[:, 0]
    lengths = jnp.array([3, 13], jnp.int32)
    hidden = (jnp.arange(32)[None, :] >= lengths[:, None])[:, :, None, None]
    bad_k, bad_v = (jnp.where(hidden, jnp.nan, x) for x in (k, v))
    want = jattn.decode_attention(q, k, v, lengths)
    got = offload.sharded_decode_attention(q, bad_k, bad_v, lengths, mesh=mesh, shard_by=shard_by)
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


def test_mosaic_gets_keys_past_the_lengths_zeroed(rng, monkeypatch):
    """The Mosaic kernel (GPU only) multiplies hidden keys by 0; the dispatcher zeroes the slots
    past the lengths before calling it. Stand-in: jax.nn's XLA path, which has the same 0 * NaN."""

    def naive(args, config):
        out, lse = jax.nn.dot_product_attention(
            args.query,
            args.key,
            args.value,
            key_value_seq_lengths=args.key_value_seq_lengths,
            return_residual=True,
        )
        return out, lse.astype(jnp.float32)

    monkeypatch.setitem(jattn.attention._REGISTRY, "mosaic", naive)
    q, k, v = make_inputs(rng, (2, 4, 9, 2, 1, 8))
    lengths = jnp.array([3, 9], jnp.int32)
    hidden = (jnp.arange(9)[None, :] >= lengths[:, None])[:, :, None, None]
    bad_k, bad_v = (jnp.where(hidden, jnp.nan, x) for x in (k, v))
    want = jattn.reference.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
    got = jattn.dot_product_attention(
        q, bad_k, bad_v, key_value_seq_lengths=lengths, implementation="mosaic"
    )
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked", "triton"])
def test_padded_query_rows_with_nan_reach_no_key_gradient(rng, implementation):
    """NaN in query rows past query_seq_lengths: the real rows' outputs and every dk, dv equal
    those of clean inputs (the padded rows give 0 and get zero gradients)."""
    q, k, v = make_inputs(rng, (2, 10, 12, 2, 1, 16))
    lengths = jnp.array([4, 10], jnp.int32)
    padded = (jnp.arange(10)[None, :] >= lengths[:, None])[:, :, None, None]
    bad_q = jnp.where(padded, jnp.nan, q)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    options = dict(
        query_seq_lengths=lengths,
        is_causal=True,
        implementation=implementation,
        config=IMPLEMENTATIONS[implementation],
    )

    def loss(q, k, v):
        return jnp.sum(jattn.dot_product_attention(q, k, v, **options) * cotangent)

    assert_close(
        jattn.dot_product_attention(bad_q, k, v, **options),
        np.asarray(jattn.dot_product_attention(q, k, v, **options), np.float64),
        TOLERANCE[jnp.float32],
    )
    for name, g, w in zip("qkv", _grads(loss, bad_q, k, v), _grads(loss, q, k, v), strict=True):
        assert bool(jnp.isfinite(g).all()), f"d{name} not finite"
        assert_close(g, np.asarray(w, np.float64), GRAD_TOLERANCE[jnp.float32])
