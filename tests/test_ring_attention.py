"""jattn.parallel.ring_attention on 2, 4 and 8 simulated CPU devices: equal to one device's
dot_product_attention and to the float64 oracle, forward and backward; zig-zag order; memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jattn
from jattn import parallel

import oracle
from cases import GRAD_TOLERANCE, TOLERANCE, assert_close, oracle_attention


def _mesh(n, axis_type=jax.sharding.AxisType.Auto):
    return jax.make_mesh((n,), ("seq",), axis_types=(axis_type,), devices=jax.devices()[:n])


def _inputs(rng, batch, length, heads, kv_heads, dim, dtype):
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), dtype)
    return q, k, v


def _check(rng, q, k, v, *, n, options, implementation="xla_chunked", layout="contiguous"):
    """ring_attention (output, lse, dq/dk/dv under random cotangents) against the float64
    oracle and against one device's dot_product_attention. xla_chunked (the default off the
    GPU) has a backward at given residuals: the ring's block gradients come from it; xla has
    none: the ring differentiates each block's forward."""
    dtype = {np.dtype(t): t for t in TOLERANCE}[q.dtype]  # the tables key jnp scalar types
    mesh = _mesh(n)
    seq = NamedSharding(mesh, P(None, "seq"))
    q, k, v = (jax.device_put(x, seq) for x in (q, k, v))

    def ring(q, k, v):
        return parallel.ring_attention(
            q,
            k,
            v,
            mesh=mesh,
            axis="seq",
            return_residual=True,
            layout=layout,
            implementation=implementation,
            **options,
        )

    (out, lse), vjp = jax.vjp(ring, q, k, v)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    assert out.sharding.spec[1] == "seq"
    want_out, want_lse, cache, _ = oracle_attention(q, k, v, options)
    assert_close(out, want_out, TOLERANCE[dtype], "out")
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse, np.float32)), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    lse_tol = tuple(t * np.abs(want_lse[finite]).max(initial=1.0) for t in TOLERANCE[dtype])
    assert_close(np.asarray(lse, np.float32)[finite], want_lse[finite], lse_tol, "lse")
    single = jattn.dot_product_attention(q, k, v, implementation="xla", **options)
    assert_close(out, np.asarray(single.astype(jnp.float32), np.float64), TOLERANCE[dtype], "1 dev")

    d_out = jnp.asarray(rng.standard_normal(out.shape), dtype)
    d_lse = jnp.asarray(np.where(finite, rng.standard_normal(lse.shape), 0.0), dtype)
    grads = vjp((d_out, d_lse))
    as64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
    want = oracle.attention_vjp(cache, as64(d_out), as64(d_lse))
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want[:3], strict=True):
        assert got.dtype == dtype and got.shape == expected.shape, name
        assert np.isfinite(np.asarray(got, np.float32)).all(), name
        scale = max(1.0, np.abs(expected).max())
        assert_close(got, expected, tuple(t * scale for t in GRAD_TOLERANCE[dtype]), name)
    return out, lse


def _segments(rng, batch, length, count=3):
    return np.sort(rng.integers(0, count, (batch, length)), 1).astype(np.int32)


@pytest.mark.parametrize(
    "n, causal, segments",
    [(8, True, False), (2, True, True), (4, False, True), (8, False, False)],
    ids=["causal-8", "causal-segments-2", "full-segments-4", "full-8"],
)
def test_ring_equals_one_device(rng, n, causal, segments):
    # GQA 4:2, T = 64 over n devices (chunks of 4 tokens at n = 8, causal); segment ids travel
    # with the K/V blocks.
    q, k, v = _inputs(rng, 2, 64, 4, 2, 16, jnp.float32)
    options = dict(is_causal=causal)
    if segments:
        ids = jnp.asarray(_segments(rng, 2, 64, count=5))
        options["segment_ids"] = (ids, ids)
    _check(rng, q, k, v, n=n, options=options)


def test_ring_as_a_while_loop_beyond_the_unrolled_steps(rng, monkeypatch):
    # Rings longer than UNROLL_STEPS run their steps in a fori_loop: the same results.
    monkeypatch.setattr(parallel, "UNROLL_STEPS", 1)
    q, k, v = _inputs(rng, 1, 64, 2, 1, 16, jnp.float32)
    _check(rng, q, k, v, n=4, options=dict(is_causal=True))


@pytest.mark.parametrize("implementation", ["xla_chunked", "xla"])
def test_ring_fully_masked_rows_are_zero_not_nan(rng, implementation):
    # Queries of segment 9 see no key anywhere on the ring: output 0, lse -inf, zero gradients.
    q, k, v = _inputs(rng, 1, 64, 2, 2, 16, jnp.float32)
    kv_ids = _segments(rng, 1, 64)
    q_ids = kv_ids.copy()
    q_ids[0, 10:20] = 9
    options = dict(is_causal=True, segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids)))
    out, lse = _check(rng, q, k, v, n=4, options=options, implementation=implementation)
    assert (np.asarray(out)[0, 10:20] == 0).all()
    assert np.isneginf(np.asarray(lse)[0, 10:20]).all()


@pytest.mark.parametrize(
    "implementation, residual", [("xla_chunked", True), ("triton", True), ("xla", False)]
)
def test_ring_backward_takes_the_kernels_backward_at_the_merged_residuals(implementation, residual):
    """Whether the block gradients come from a backward kernel fed the merged out and lse
    (nothing recomputed) or from differentiating each block's forward."""
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    options = dict(scale=None, implementation=implementation, config=None)
    for causal in (False, True):
        found = parallel._has_residual_backward(q, q, q, None, None, causal=causal, options=options)
        assert found is residual


def test_ring_bf16_with_xla_chunked(rng):
    q, k, v = _inputs(rng, 1, 64, 4, 1, 32, jnp.bfloat16)
    _check(rng, q, k, v, n=4, options=dict(is_causal=True), implementation="xla_chunked")


def test_ring_zigzag_layout_and_order_round_trip(rng):
    n = 4
    q, k, v = _inputs(rng, 2, 64, 2, 1, 16, jnp.float32)
    zig = [parallel.ring_order(x, n) for x in (q, k, v)]
    np.testing.assert_array_equal(parallel.ring_unorder(zig[0], n), q)
    # Device 1 of 4 holds chunks 1 and 6 of 8 (8 tokens each).
    np.testing.assert_array_equal(zig[0][:, 16:24], q[:, 8:16])
    np.testing.assert_array_equal(zig[0][:, 24:32], q[:, 48:56])
    mesh = _mesh(n)
    out = parallel.ring_attention(
        *zig, mesh=mesh, axis="seq", is_causal=True, layout="zigzag", implementation="xla"
    )
    want = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert_close(
        parallel.ring_unorder(out, n), np.asarray(want, np.float64), TOLERANCE[jnp.float32]
    )


def test_ring_with_the_triton_kernel_interpret(rng):
    q, k, v = _inputs(rng, 1, 32, 2, 1, 16, jnp.float32)
    _check(rng, q, k, v, n=2, options=dict(is_causal=False), implementation="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", [None, "mosaic", "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_on_two_gpus(rng, implementation, causal):
    """On 2 GPUs with the compiled kernels: their backward kernels fed the merged out and lse
    (implementation=None: cuDNN's forward, the Mosaic backward). GQA 4:2, H = 128, bf16.
    (Mosaic GPU's interpreter hangs under shard_map over 2 CPU devices: GPU only.)"""
    if jax.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    q, k, v = _inputs(rng, 1, 1024, 4, 2, 128, jnp.bfloat16)
    _check(rng, q, k, v, n=2, options=dict(is_causal=causal), implementation=implementation)


def test_ring_explicit_mesh_forward(rng):
    q, k, v = _inputs(rng, 1, 64, 2, 2, 16, jnp.float32)
    mesh = _mesh(2, jax.sharding.AxisType.Explicit)
    out = parallel.ring_attention(q, k, v, mesh=mesh, axis="seq", is_causal=True)
    want = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert_close(out, np.asarray(want, np.float64), TOLERANCE[jnp.float32])


def test_ring_backward_saves_only_local_blocks(rng):
    """The residuals kept for the backward are O(T/n) per device: the local q, k, v, output and
    lse (a ring differentiated as plain JAX would keep all n visiting K/V blocks)."""
    n = 8
    mesh = _mesh(n)
    seq = NamedSharding(mesh, P(None, "seq"))
    q, k, v = (jax.device_put(x, seq) for x in _inputs(rng, 1, 128, 2, 2, 16, jnp.float32))
    _, f_vjp = jax.vjp(
        lambda q, k, v: parallel.ring_attention(
            q, k, v, mesh=mesh, axis="seq", is_causal=True, implementation="xla"
        ),
        q,
        k,
        v,
    )
    per_device: dict = {}
    for leaf in jax.tree.leaves(f_vjp):
        for shard in getattr(leaf, "addressable_shards", []):
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    block = q.nbytes // n
    assert len(per_device) == n
    assert max(per_device.values()) <= 4.5 * block + 1024, (per_device, block)


def test_ring_with_a_data_parallel_batch_axis(rng):
    """A 2 x 4 mesh: B cut over 'data', the sequence over the ring 'seq'; forward and grads."""
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k, v = _inputs(rng, 2, 64, 4, 2, 16, jnp.float32)
    ids = jnp.asarray(_segments(rng, 2, 64))
    options = dict(is_causal=True, segment_ids=(ids, ids))

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))

    ring = functools.partial(
        parallel.ring_attention, mesh=mesh, axis="seq", batch_axis="data", **options
    )
    one = functools.partial(jattn.dot_product_attention, implementation="xla", **options)
    out = ring(q, k, v)
    assert out.sharding.spec[:2] == ("data", "seq")
    assert_close(out, np.asarray(one(q, k, v), np.float64), TOLERANCE[jnp.float32])
    grads = jax.grad(loss(ring), (0, 1, 2))(q, k, v)
    for got, want in zip(grads, jax.grad(loss(one), (0, 1, 2))(q, k, v), strict=True):
        assert_close(got, np.asarray(want, np.float64), GRAD_TOLERANCE[jnp.float32])
    with pytest.raises(ValueError, match="B must be divisible by it"):
        ring(q[:1], k[:1], v[:1], segment_ids=None)


@pytest.mark.parametrize(
    "length, causal, kwargs, message",
    [
        (60, False, {}, r"divisible by 8; got query \(1, 60, 2, 16\)"),
        (72, True, {}, r"S == T divisible by 2n = 16.*\(1, 72, 2, 16\)"),
        (64, False, dict(axis="data"), "axis 'data' is not an axis"),
        (64, True, dict(layout="striped"), "layout must be one of"),
        (64, False, dict(segment_ids=(np.zeros((1, 63), int),) * 2), r"segment_ids must be"),
    ],
)
def test_ring_bad_input_raises(rng, length, causal, kwargs, message):
    q, k, v = _inputs(rng, 1, length, 2, 2, 16, jnp.float32)
    kwargs = dict(dict(mesh=_mesh(8), axis="seq", is_causal=causal), **kwargs)
    with pytest.raises(ValueError, match=message):
        parallel.ring_attention(q, k, v, **kwargs)
