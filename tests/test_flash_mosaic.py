"""The Mosaic GPU flash kernel (`implementation="mosaic"`).

On CPU: the kernel runs in Mosaic GPU's interpret mode (TMA copies, barriers and the
producer/consumer warpgroups simulated) against the float64 oracle, gradients included (they
come from the Triton backward); and the GPU code path is lowered to Mosaic GPU IR for the CUDA
platform (`jax.export`), which checks wgmma operand layouts, swizzles and shared memory without
a GPU. On a Hopper GPU (`-m gpu`): every feature at real sizes against the reference.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jattn
from jattn import reference
from pallas_kernels import flash_mosaic, mosaic_common

from cases import (
    FEATURES,
    GRAD_TOLERANCE,
    TOLERANCE,
    assert_close,
    check_against_oracle,
    make_inputs,
    make_options,
    run_state_literals,
)

SMALL = jattn.MosaicConfig(block_q=64, block_kv=64, num_stages=2)
# The interpreter simulates every warpgroup and barrier: a few seconds per program and kernel,
# so most cases use one program per head: MQA, two key tiles (the last partial), H 40 -> 64.
TINY = (1, 50, 90, 2, 1, 40)
# Two query programs of 128 rows, four key tiles of 64 (the last one partial), GQA 2, H padded
# from 72 to 128: tile skipping and the unmasked inner range on both axes. (Two KV heads of
# GQA groups run on the GPU: -m gpu, test_gpu_every_feature_matches_oracle's 8:2.)
MULTI_TILE = (1, 150, 200, 2, 1, 72)


# In the default run, the features whose code paths differ (no mask, empty rows, dense masks,
# bias, the combined cases); the others repeat those paths with other numbers and run with
# `-m slow` here and at real sizes on the GPU (`-m gpu`).
DEFAULT_RUN = ("plain", "lengths_empty", "mask", "bias_full", "causal_window_bias_softcap")


@pytest.mark.parametrize(
    "feature",
    [f if f in DEFAULT_RUN else pytest.param(f, marks=pytest.mark.slow) for f in FEATURES],
)
def test_every_feature_matches_oracle_bfloat16(rng, feature):
    options = make_options(rng, feature, TINY)
    check_against_oracle(rng, TINY, options, jnp.bfloat16, "mosaic", SMALL)


@pytest.mark.parametrize(
    ("feature", "dtype"),
    [
        ("causal_window_bias_softcap", jnp.bfloat16),
        pytest.param("segments_causal_lengths", jnp.float16, marks=pytest.mark.slow),
    ],
)
def test_combined_features_over_many_tiles(rng, feature, dtype):
    options = make_options(rng, feature, MULTI_TILE)
    check_against_oracle(rng, MULTI_TILE, options, dtype, "mosaic", SMALL)


@pytest.mark.parametrize("scale", [-0.6, 0.0])
def test_forward_takes_the_row_max_of_the_logits_for_any_sign_of_scale(rng, scale):
    """The forward takes its row max on q.k and folds the scale into exp2's argument only where
    scale > 0 (`mosaic_common.folded_scale`): a negative scale would pick the row's min, and at
    0 a hidden key's -inf * 0 is NaN. Causal, so a tile hides keys (-inf) in every case."""
    options = make_options(rng, "causal", TINY) | dict(scale=scale)
    check_against_oracle(rng, TINY, options, jnp.bfloat16, "mosaic", SMALL, gradients=False)


def test_folded_scale_only_where_the_logits_are_q_k_times_a_positive_scale():
    st = mosaic_common.Static(
        scale=0.125, softcap=None, right=0, left=None, check_q_len=False, check_kv_len=False,
        dense_masks=False, has_bias=False, has_mask=False, has_segments=False, groups=1,
        block_q=64, block_kv=128, num_stages=2, schedule_barrier=True, interpret=False,
    )  # fmt: skip
    assert mosaic_common.folded_scale(st) == pytest.approx(0.125 * np.log2(np.e))
    for changes in (dict(scale=-0.125), dict(scale=0.0), dict(softcap=20.0), dict(has_bias=True)):
        assert mosaic_common.folded_scale(dataclasses.replace(st, **changes)) is None


def test_gradient_through_a_jit_with_traced_lengths_and_segments(rng):
    """`jax.grad(jax.jit(f))`: the kernel's custom_vjp takes its integer arrays (bounds, lengths,
    segment ids) as arguments; closed over, they failed there with "No constant handler for
    type DynamicJaxprTracer" (on the H200 and in interpret mode)."""
    batch, length, heads, dim = 1, 64, 1, 64  # one head: the interpreter's time is per program
    q, k, v = (
        jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float16) for _ in range(3)
    )
    lengths = jnp.array([50], jnp.int32)
    ids = jnp.asarray((np.arange(length) >= 20).astype(np.int32))[None]

    def loss(attend, q, k, v, lengths, ids):
        out = attend(q, k, v, is_causal=True, key_value_seq_lengths=lengths, segment_ids=(ids, ids))
        return jnp.sum(out.astype(jnp.float32) ** 2)

    mosaic = lambda *a, **o: jattn.dot_product_attention(*a, **o, implementation="mosaic")
    grads = jax.grad(jax.jit(lambda *a: loss(mosaic, *a)), (0, 1, 2))(q, k, v, lengths, ids)
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(lambda *a: loss(reference.dot_product_attention, *a), (0, 1, 2))(
        *upcast, lengths, ids
    )
    for got, expected in zip(grads, want, strict=True):
        assert_close(got, expected, GRAD_TOLERANCE[jnp.float16])


@pytest.mark.timeout(300)
def test_jit_of_grad_with_a_boolean_mask_finishes(rng):
    """`jax.jit(jax.grad(f))` with a mask operand (issue 19, 1b). With the mask closed over by
    the custom_vjp (before 87a4cbf) this never finished in interpret mode: not a barrier
    deadlock (the same kernels finish eagerly, under the interpreter's exact-phase checks), but
    the interpreter starving itself. Each simulated warpgroup is its own XLA:CPU program and
    `barrier_wait` a blocking host callback; XLA ran the forward's consumer programs on its
    intra-op pool (one thread per core), where the enclosing thread_map callback and consumer
    1's wait at the ping-pong turn barrier held both threads, so consumer 0 never ran to arrive.
    """
    length, heads, dim = 24, 2, 32
    q, k, v = (
        jnp.asarray(rng.standard_normal((1, length, heads, dim)), jnp.float16) for _ in range(3)
    )
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]

    def loss(attend, q, k, v, mask):
        return jnp.sum(attend(q, k, v, mask=mask).astype(jnp.float32) ** 2)

    mosaic = lambda *a, **o: jattn.dot_product_attention(*a, **o, implementation="mosaic")
    grads = jax.jit(jax.grad(lambda *a: loss(mosaic, *a), (0, 1, 2)))(q, k, v, mask)
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(lambda *a: loss(reference.dot_product_attention, *a), (0, 1, 2))(*upcast, mask)
    for got, expected in zip(grads, want, strict=True):
        assert_close(got, expected, GRAD_TOLERANCE[jnp.float16])


def test_one_and_three_stages_with_and_without_the_schedule_barrier(rng):
    # TINY with one query head (one program: half the interpreter's time); the pipeline over
    # the two key tiles is the same, the MQA head mapping is test_every_feature_matches_oracle's.
    shape = (*TINY[:3], 1, 1, TINY[5])
    for stages, schedule_barrier in ((1, False), (3, True)):
        config = jattn.MosaicConfig(
            block_q=64,
            block_kv=64,
            num_stages=stages,
            bwd_num_stages=stages,
            schedule_barrier=schedule_barrier,
        )
        options = make_options(rng, "causal_bottom_right", shape)
        check_against_oracle(rng, shape, options, jnp.bfloat16, "mosaic", config)


# The forward's schedule options: a persistent grid (interpret mode runs two programs, each
# looping over tiles: the K/V ring and the barrier phases carry across them), causal tiles
# longest first and the early K wait (both on by default), the named-barrier turns (GPU only:
# the interpreter keeps the mbarrier, the lowering below checks the PTX path).
PERSISTENT = jattn.MosaicConfig(
    block_q=64, block_kv=64, num_stages=2, persistent=True, named_barrier=True
)


@pytest.mark.parametrize(
    ("feature", "shape"),
    [
        ("segments_causal_lengths", (1, 150, 200, 2, 1, 72)),  # O in a buffer of its own
        ("causal_bottom_right", (1, 150, 200, 2, 1, 200)),  # H 256: O takes Q's buffer
    ],
)
def test_persistent_grid_matches_oracle(rng, feature, shape):
    head_dim = shape[-1]
    assert flash_mosaic.o_buffer_fits(PERSISTENT, head_dim, 0) == (head_dim <= 128)
    options = make_options(rng, feature, shape)  # the forward's schedule: no backward to check
    check_against_oracle(rng, shape, options, jnp.bfloat16, "mosaic", PERSISTENT, gradients=False)


@pytest.mark.parametrize(
    "case, shape, options",
    [  # 64 x 64 tiles: each consumer's unmasked key range is what overlaps (one head: the
        # schedule is per program)
        ("all_unmasked", (1, 150, 256, 1, 1, 72), {}),  # the peeled first step, last P V after
        ("unmasked_then_diagonal", (1, 150, 400, 1, 1, 72), dict(is_causal=True, q_offset=250)),
        ("masked_unmasked_masked", (1, 300, 400, 1, 1, 64), dict(local_window_size=(100, 100))),
        ("empty_rows", (2, 150, 200, 1, 1, 72), "lengths_empty"),  # lo == hi
        ("dense_mask_falls_back", (1, 150, 200, 1, 1, 72), "segments_causal_lengths"),
    ],
)
def test_softmax_overlap_matches_oracle(rng, case, shape, options):
    """FlashAttention-3's intra-warpgroup overlap (Q K^T of a step issued with the previous
    step's P V) on the unmasked key range, plain steps on the masked edges around it (the
    rescale where it starts after masked steps, the next K waited where it ends before them),
    with the ping-pong turns (mbarrier here) counted as in the plain loop."""
    config = dataclasses.replace(SMALL, softmax_overlap=True)
    if isinstance(options, str):
        options = make_options(rng, options, shape)  # a forward schedule: no backward to check
    check_against_oracle(rng, shape, options, jnp.bfloat16, "mosaic", config, gradients=False)


def _dq_rings(monkeypatch) -> list[tuple[int, int]]:
    """Records (keys per step, ring stages) of each dq kernel launched from now on."""
    from pallas_kernels import flash_mosaic_bwd

    rings, dq = [], flash_mosaic_bwd._dq
    monkeypatch.setattr(
        flash_mosaic_bwd,
        "_dq",
        lambda st, *a: rings.append((st.block_kv, st.num_stages)) or dq(st, *a),
    )
    return rings


def _paired_products(monkeypatch, everywhere: bool = True) -> list[int]:
    """Turns the dq kernel's paired products on at every head dim (PAIRED_DQ_HEAD_DIMS; or
    leaves the default's head dims); the returned list grows by one per pair of transposed
    products traced from now on."""
    from pallas_kernels import flash_mosaic_bwd

    pairs, both = [], flash_mosaic_bwd.mma_transposed_both
    if everywhere:
        monkeypatch.setattr(flash_mosaic_bwd, "PAIRED_DQ_HEAD_DIMS", (64, 128, 256))
    monkeypatch.setattr(
        flash_mosaic_bwd, "mma_transposed_both", lambda *a: pairs.append(1) or both(*a)
    )
    return pairs


@pytest.mark.slow  # the default run pairs at H = 256: test_backward_above_h128_splits_dk_dv...
def test_backward_with_paired_products_matches_the_oracle(rng, monkeypatch):
    """Paired products: S and dP issued together in the dq kernel (one wait), here at padded
    H = 64 where they are off by default: MQA, bottom-right causal with T != S, a partial last
    key tile."""
    pairs = _paired_products(monkeypatch)
    options = make_options(rng, "causal_bottom_right", TINY)
    check_against_oracle(rng, TINY, options, jnp.bfloat16, "mosaic", SMALL)
    assert pairs, "the paired products never ran"


@pytest.mark.parametrize(
    "feature",
    [
        "segments_causal_lengths",
        # the diagonal in split dk/dv programs is also in test_flex's H = 160 block-mask case
        pytest.param("window_causal", marks=pytest.mark.slow),
        pytest.param("mask", marks=pytest.mark.slow),  # 37 s in interpret mode
    ],
)
def test_backward_above_h128_splits_dk_dv_by_columns(rng, feature, monkeypatch):
    """Above H = 128 the dk/dv kernel's two consumers share one block of keys and each keeps
    half of dK's and dV's columns (H = 160 computes as two parts of 128): key segment ids
    loaded once for both, masks on the shared keys, GQA's per-head sums; without a mask tile
    each computes S^T and dP^T for half of a step's queries and they trade halves of P^T and
    dS^T (`QUERY_SPLIT`). The dq kernel runs at padded H = 256, where it issues S and dP
    together (`PAIRED_DQ_HEAD_DIMS`)."""
    from pallas_kernels import flash_mosaic_bwd

    pairs = _paired_products(monkeypatch, everywhere=False)
    assert flash_mosaic_bwd.head_parts(160) == 2 and flash_mosaic_bwd.head_parts(128) == 1
    assert flash_mosaic_bwd.backward_head_dim(160, 2) == 256
    shape = (1, 100, 140, 2, 1, 160)  # GQA 2: a dk/dv program sums two query heads
    options = make_options(rng, feature, shape)
    config = dataclasses.replace(SMALL, bwd_head_split=True)
    if feature != "window_causal":  # and a ring of its own depth: dk/dv 3 stages, dq 1
        config = dataclasses.replace(config, bwd_num_stages=1, bwd_dkdv_stages=3)
    halves_traded = []  # without a mask tile the consumers split each step's queries
    load_tile = flash_mosaic_bwd.load_tile
    monkeypatch.setattr(
        flash_mosaic_bwd, "load_tile", lambda *a: halves_traded.append(1) or load_tile(*a)
    )
    dq_rings = _dq_rings(monkeypatch)  # a one-stage ring runs in halves (`DQ_HALF_KEYS`)
    check_against_oracle(rng, shape, options, jnp.bfloat16, "mosaic", config)
    assert bool(halves_traded) == (feature != "mask")
    one_stage = {"segments_causal_lengths": (32, 2), "mask": (64, 1)}  # (a mask tile: 64 keys)
    assert set(dq_rings) == {one_stage.get(feature, (64, 2))}, dq_rings
    assert pairs, "the dq kernel's paired products never ran"


@pytest.mark.parametrize(
    "feature, shape, split",
    [
        # GQA, H 72 -> 128, edges (-m slow: the default run has the fused backward under a
        # bottom-right causal block mask, test_flex's (64, 128, True, 64) case, and with
        # segment ids and NaN keys in test_visibility)
        pytest.param("causal_bottom_right", (1, 150, 200, 2, 1, 72), False, marks=pytest.mark.slow),
        ("segments_causal_lengths", (1, 150, 200, 2, 2, 40), False),
        # H > 128: dQ by column parts (39 s in interpret mode; the fused backward is opt-in)
        pytest.param("mask", (1, 150, 200, 4, 2, 160), True, marks=pytest.mark.slow),
    ],
)
def test_fused_dq_backward(rng, feature, shape, split, monkeypatch):
    """bwd_fused_dq: the dk/dv kernel adds each step's dS @ K into a float32 dQ and the dq
    kernel never runs; gradients against the float64 oracle, rows that see nothing included."""
    from pallas_kernels import flash_mosaic_bwd

    def no_dq_kernel(*args, **kwargs):
        raise AssertionError("the dq kernel ran")

    monkeypatch.setattr(flash_mosaic_bwd, "_dq", no_dq_kernel)
    config = dataclasses.replace(SMALL, bwd_fused_dq=True, bwd_head_split=split)
    check_against_oracle(
        rng, shape, make_options(rng, feature, shape), jnp.bfloat16, "mosaic", config
    )


@pytest.mark.slow  # 14 s interpreted; the -m gpu case below ran on the H200 (stop 36)
def test_fused_dq_backward_folds_jax_vmap_into_the_batch(rng, monkeypatch):
    """bwd_fused_dq under jax.vmap (its launch with dQ as a Ref batches no other way): the
    mapped axis is folded into the batch (`flash_mosaic_bwd.folding_vmap`), one dk/dv launch
    over V * B rows, with a mapped segment-id operand and an unmapped bias of batch 1; the
    gradients are the bits of the unmapped call on the folded batch."""
    config = dataclasses.replace(SMALL, bwd_fused_dq=True)
    _check_vmap_folding(rng, monkeypatch, TINY, config, exact=True)


def _check_vmap_folding(rng, monkeypatch, shape, config, exact: bool):
    from pallas_kernels import flash_mosaic_bwd

    launches, launch = [], flash_mosaic_bwd._launch

    def spy(kernel, st, operands, scratch, out_names, out_type, grid, **kwargs):
        launches.append(grid[2])  # the batch axis of the grid
        return launch(kernel, st, operands, scratch, out_names, out_type, grid, **kwargs)

    monkeypatch.setattr(flash_mosaic_bwd, "_launch", spy)
    mapped, (batch, q_len, kv_len, heads) = 2, shape[:4]
    q, k, v = (jnp.stack([x] * mapped) for x in make_inputs(rng, shape, jnp.bfloat16))
    q = q * jnp.asarray([1.0, -0.5], jnp.bfloat16)[:, None, None, None, None]
    ids = jnp.asarray(rng.integers(0, 2, (mapped, batch, q_len)), jnp.int32)
    kv_ids = jnp.asarray(rng.integers(0, 2, (mapped, batch, kv_len)), jnp.int32)
    bias = jnp.asarray(rng.standard_normal((1, heads, q_len, kv_len)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(q.shape[1:]), jnp.float32)

    def loss(q, k, v, ids, kv_ids, cotangent):
        out = jattn.dot_product_attention(
            q, k, v, bias=bias, segment_ids=(ids, kv_ids), implementation="mosaic", config=config
        )
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    got = jax.vmap(grad, in_axes=(0, 0, 0, 0, 0, None))(q, k, v, ids, kv_ids, cotangent)
    assert launches.count(mapped * batch) == 1, launches  # the dk/dv kernel, once, folded
    fold = lambda x: x.reshape(mapped * batch, *x.shape[2:])  # noqa: E731
    want = grad(*map(fold, (q, k, v, ids, kv_ids)), jnp.tile(cotangent, (mapped, 1, 1, 1)))
    for g, w in zip(got, want, strict=True):  # rows are independent
        g, w = np.asarray(fold(g), np.float32), np.asarray(w, np.float32)
        if exact:  # interpret mode: the same bits
            np.testing.assert_array_equal(g, w)
        else:  # the GPU's reduce-adds of dQ sum in any order
            assert_close(g, w.astype(np.float64), GRAD_TOLERANCE[jnp.bfloat16])


def test_bias_and_mask_without_dbias_use_the_mosaic_backward(rng, monkeypatch):
    """With the bias not differentiated, dq/dk/dv come from the Mosaic GPU kernels, where bias
    and mask enter the dk/dv kernel transposed."""
    from pallas_kernels import flash_triton

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton backward ran")

    monkeypatch.setattr(flash_triton, "backward", no_triton)
    q, k, v = make_inputs(rng, TINY, jnp.bfloat16)
    batch, q_len, kv_len, heads = TINY[:4]
    bias = jnp.asarray(rng.standard_normal((batch, heads, q_len, kv_len)), jnp.float32)
    mask = jnp.asarray(rng.random((batch, 1, q_len, kv_len)) < 0.7)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def grads(implementation, config=None):
        def loss(q, k, v):
            out = jattn.dot_product_attention(
                q, k, v, bias, mask=mask, implementation=implementation, config=config
            )
            return jnp.sum(out.astype(jnp.float32) * d_out)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    want = grads("xla")  # float32 math inside on the same bfloat16 inputs
    for name, got, expected in zip("qkv", grads("mosaic", SMALL), want, strict=True):
        scale = max(1.0, float(np.abs(np.asarray(expected, np.float32)).max()))
        assert_close(got, np.asarray(expected, np.float64), (6e-2 * scale, 6e-2), "d" + name)


def test_hidden_key_tiles_are_never_loaded(rng):
    """NaN in the keys and values that causal masking hides from a whole program: a tile that
    were loaded and masked would still put 0 * NaN into the output."""
    q, k, v = make_inputs(rng, (1, 128, 256, 1, 1, 64), jnp.bfloat16)
    k, v = (x.at[:, 128:].set(jnp.nan) for x in (k, v))  # keys 128.. : after every query
    out = jattn.dot_product_attention(
        q, k, v, is_causal=True, implementation="mosaic", config=SMALL
    )
    assert np.isfinite(np.asarray(out, np.float32)).all()
    want = reference.dot_product_attention(q, k[:, :128], v[:, :128], is_causal=True)
    assert_close(out, np.asarray(want, np.float64), TOLERANCE[jnp.bfloat16])


def test_declines_what_it_does_not_serve(rng):
    q, k, v = make_inputs(rng, (1, 8, 8, 2, 2, 16))
    with pytest.raises(NotImplementedError, match="float16/bfloat16"):
        jattn.dot_product_attention(q, k, v, implementation="mosaic")
    q, k, v = make_inputs(rng, (1, 8, 8, 2, 2, 264), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="head dims up to 256"):
        jattn.dot_product_attention(q, k, v, implementation="mosaic")
    q, k, v = make_inputs(rng, (1, 8, 8, 2, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="takes a MosaicConfig, got a TritonConfig"):
        jattn.dot_product_attention(q, k, v, implementation="mosaic", config=jattn.TritonConfig())
    # auto-dispatch passes over the decline to the next implementation
    got = jattn.dot_product_attention(
        *make_inputs(rng, (1, 8, 8, 2, 2, 16)), implementation=("mosaic", "xla")
    )
    assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(block_q=32),
        dict(block_q=192),
        dict(block_kv=96),
        dict(block_kv=0),
        dict(num_stages=0),
        dict(bwd_dkdv_stages=0),
        dict(bwd_head_split=1),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        jattn.MosaicConfig(**kwargs)


@pytest.mark.parametrize(
    "head_dim, block_kv, forward, backward",
    [
        (64, 256, False, True),  # default_config's H = 64 tiles: the second pass spills
        (64, 128, True, True),
        (96, 128, True, True),
        (128, 128, True, True),
        (256, 64, True, False),
    ],
)
def test_redo_defaults_follow_the_h200_runs(head_dim, block_kv, forward, backward):
    """redo_hidden / bwd_redo_hidden left None take the measured rule (the forward's where its
    second pass fits registers and no segment ids, the dq kernel's up to H = 128); a value the
    user set stays."""
    config = jattn.MosaicConfig(block_kv=block_kv)
    resolved = flash_mosaic.redo_defaults(config, head_dim)
    assert (resolved.redo_hidden, resolved.bwd_redo_hidden) == (forward, backward)
    for value in (True, False):
        mine = dataclasses.replace(config, redo_hidden=value, bwd_redo_hidden=not value)
        kept = flash_mosaic.redo_defaults(mine, head_dim)
        assert (kept.redo_hidden, kept.bwd_redo_hidden) == (value, not value)
    # segment ids: the forward cleans (measured faster at H = 128), the dq kernel's rule holds
    with_segments = flash_mosaic.redo_defaults(config, head_dim, segments=True)
    assert (with_segments.redo_hidden, with_segments.bwd_redo_hidden) == (False, backward)
    with pytest.raises(ValueError, match="redo_hidden must be a bool"):
        jattn.MosaicConfig(redo_hidden=1)


def test_default_config_fits_shared_memory():
    """The forward always fits; the backward fits without bias/mask tiles at every head dim
    (with a float32 bias at H > 128, the Triton backward takes over)."""
    for head_dim in (16, 64, 72, 128, 200, 256):
        for pair_itemsize in (0, 1, 2, 4, 5):
            config = flash_mosaic.default_config(head_dim, pair_itemsize)
            need = flash_mosaic.shared_memory_estimate(config, head_dim, pair_itemsize)
            assert flash_mosaic.fits_shared_memory(need), (head_dim, pair_itemsize, config)
            if pair_itemsize <= 2 or head_dim <= 128:
                need = flash_mosaic.backward_shared_memory_estimate(config, head_dim, pair_itemsize)
                assert flash_mosaic.fits_shared_memory(need), (head_dim, pair_itemsize, config)


# --- the GPU code path, lowered for CUDA on this machine ----------------------------------------

FUSED_H128 = dataclasses.replace(flash_mosaic.default_config(128), bwd_fused_dq=True)
FUSED_H256 = dataclasses.replace(  # dk/dv's ring at 1 stage: dS and dQ tiles beside it
    flash_mosaic.default_config(256), bwd_fused_dq=True, bwd_dkdv_stages=None
)
UNSPLIT_H256 = dataclasses.replace(  # dK, dV unsplit: over the registers, the Triton backward
    flash_mosaic.default_config(256), bwd_head_split=False, bwd_dkdv_stages=None
)
REDO_H128 = dataclasses.replace(  # the tuned H200 causal config's shape, with redo_hidden
    flash_mosaic.default_config(128),
    block_kv=128,
    persistent=True,
    softmax_overlap=True,
    redo_hidden=True,
    bwd_redo_hidden=True,
)
LOWERINGS = {
    "plain_h64": ((1, 256, 256, 2, 2, 64), {}),
    "causal_lengths_gqa_h128": (
        (2, 256, 384, 4, 1, 128),
        dict(is_causal=True, query_seq_lengths=True, key_value_seq_lengths=True),
    ),
    "window_softcap_h256": (
        (1, 256, 256, 2, 1, 256),
        dict(local_window_size=(64, 0), logits_soft_cap=20.0),
    ),
    "segments_h96": ((1, 200, 300, 2, 2, 96), dict(segment_ids=True)),
    "bias_mask_h128": ((1, 256, 256, 2, 2, 128), dict(bias=True, mask=True)),
    "window_softcap_h256_unsplit": (
        (1, 256, 256, 2, 1, 256),
        dict(local_window_size=(64, 0), logits_soft_cap=20.0, config=UNSPLIT_H256),
    ),
    "bias_mask_h256": ((1, 256, 256, 2, 2, 256), dict(bias=True, mask=True)),
    "causal_segments_h128_fused_dq": (  # one backward kernel: dQ by TMA reduce-add
        (2, 256, 384, 4, 1, 128),
        dict(is_causal=True, segment_ids=True, config=FUSED_H128),
    ),
    "window_h256_fused_dq": (
        (1, 256, 256, 2, 1, 256),
        dict(local_window_size=(64, 0), config=FUSED_H256),
    ),
    "causal_lengths_h128_redo": (  # no flag read: a consumer redoes non-finite rows itself
        (2, 256, 384, 4, 1, 128),
        dict(is_causal=True, key_value_seq_lengths=True, config=REDO_H128),
    ),
    "segments_bias_h64_redo": (
        (1, 200, 300, 2, 2, 64),
        dict(
            segment_ids=True,
            bias=True,
            config=dataclasses.replace(
                flash_mosaic.default_config(64, 4), redo_hidden=True, bwd_redo_hidden=True
            ),
        ),
    ),
}


def _lower(shape, options, dtype=jnp.bfloat16, grad=False):
    """Lower dot_product_attention(implementation="mosaic") for CUDA: runs the Mosaic GPU
    lowering of the forward kernel, and with grad=True of the dq and dk/dv kernels too."""
    batch, q_len, kv_len, heads, kv_heads, dim = shape
    spec = jax.ShapeDtypeStruct
    args = [
        spec((batch, q_len, heads, dim), dtype),
        spec((batch, kv_len, kv_heads, dim), dtype),
        spec((batch, kv_len, kv_heads, dim), dtype),
    ]
    extra = {}
    if options.pop("bias", False):
        extra["bias"] = spec((1, heads, q_len, kv_len), jnp.float32)
    if options.pop("mask", False):
        extra["mask"] = spec((batch, 1, q_len, kv_len), jnp.bool_)
    if options.pop("segment_ids", False):
        extra["segment_ids"] = (spec((batch, q_len), jnp.int32), spec((batch, kv_len), jnp.int32))
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if options.pop(name, False):
            extra[name] = spec((batch,), jnp.int32)
    names = list(extra)

    def run(q, k, v, *values):
        return jattn.dot_product_attention(
            q,
            k,
            v,
            implementation="mosaic",
            **options,
            **dict(zip(names, values, strict=True)),
        )

    if grad:
        forward = run

        def run(q, k, v, *values):  # gradients of q, k, v (not of the bias: no dbias)
            def loss(q, k, v):
                return jnp.sum(forward(q, k, v, *values).astype(jnp.float32))

            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")  # H > 128 backward
    return export.export(jax.jit(run), platforms=["cuda"], disabled_checks=[triton])(
        *args, *extra.values()
    )


@pytest.mark.parametrize("fused_dq", [False, True], ids=["two_kernels", "fused_dq"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("feature", ["causal", "segments", "mask", "window"])
def test_kernels_give_run_state_no_literal_operand(rng, feature, head_dim, fused_dq, monkeypatch):
    """JAX 0.11's Mosaic GPU lowering of a run_state (a wgmma into register accumulators) fails
    on a literal operand ("Shaped arrays must be represented by ir.Values, got: TypedInt(0)"):
    a ref index half traced, half a Python int makes one (the dk/dv kernel's column part beside
    its ring slot broke every backward up to H = 128 on the H200). JAX 0.10 lowers it, so the
    traced kernels are checked: no run_state in the forward, dq or dk/dv kernel takes one."""
    monkeypatch.setattr(flash_mosaic.common, "interpret_mode", lambda: False)
    shape = (1, 256, 256, 2, 1, head_dim)
    q, k, v = make_inputs(rng, shape, jnp.bfloat16)
    options = make_options(rng, feature, shape)

    config = flash_mosaic.default_config(head_dim, int(feature == "mask"))  # the mask's byte
    config = dataclasses.replace(config, bwd_fused_dq=fused_dq, bwd_dkdv_stages=None)

    def loss(q, k, v):
        out = jattn.dot_product_attention(
            q, k, v, implementation="mosaic", config=config, **options
        )
        return jnp.sum(out.astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    assert run_state_literals(jaxpr) == []


# Cases whose config changes only the backward of another case: their forward is that case's
# (-m slow).
BACKWARD_ONLY_CONFIGS = ("window_softcap_h256_unsplit",)  # window_softcap_h256's forward


@pytest.mark.parametrize(
    "case, grad",
    [
        pytest.param(case, grad, marks=pytest.mark.slow)
        if case in BACKWARD_ONLY_CONFIGS and not grad
        else (case, grad)
        for case in LOWERINGS
        for grad in (False, True)
    ],
    ids=[f"{case}-{'backward' if grad else 'forward'}" for case in LOWERINGS for grad in (0, 1)],
)
def test_gpu_path_lowers_for_cuda(case, grad, monkeypatch):
    monkeypatch.setattr(flash_mosaic.common, "interpret_mode", lambda: False)
    pairs = _paired_products(monkeypatch, everywhere=False)
    shape, options = LOWERINGS[case]
    text = _lower(shape, dict(options), grad=grad).mlir_module()
    calls = re.findall(r"stablehlo\.custom_call @(\S+?)\(", text)
    mosaic = [c for c in calls if c == "mosaic_gpu_v2"]
    # the forward; with gradients also dq and dk/dv: on Mosaic GPU up to H = 128, and above it
    # with bwd_head_split (the default there: dK, dV split by columns over the consumers) unless
    # a float32 bias and a mask tile leave its buffers over the shared memory; on Triton otherwise
    native_backward = shape[-1] <= 128 or case in ("window_softcap_h256", "window_h256_fused_dq")
    backward_kernels = 1 if "fused_dq" in case else 2  # dk/dv alone, or dq and dk/dv
    assert len(mosaic) == 1 + (backward_kernels if grad and native_backward else 0), calls
    # the dq kernel issues S and dP together at padded H = 128 and 256 (PAIRED_DQ_HEAD_DIMS)
    dq_kernel = grad and native_backward and backward_kernels == 2
    paired_dim = flash_mosaic.padded_head_dim(shape[-1]) in (128, 256)
    assert bool(pairs) == (dq_kernel and paired_dim), case
    others = [c for c in calls if c != "mosaic_gpu_v2"]
    assert len(others) == (2 if grad and not native_backward else 0), calls
    assert all("triton" in c for c in others), calls
    # `flag_nonfinite`'s reads (about 25 us each at 64 MB on an H200) where a tile can hide
    # keys: V once for the forward (not with redo_hidden: its marks flag V for the backward),
    # and K alone for the Mosaic backward, which takes V's flag from the forward's residuals
    # (none with bwd_redo_hidden: its dq kernel redoes what went non-finite)
    pair_itemsize = 4 * bool(options.get("bias")) + bool(options.get("mask"))  # f32 bias
    config = options.get("config") or flash_mosaic.default_config(  # no tuned entry on a CPU
        shape[-1], pair_itemsize, causal=options.get("is_causal", False)
    )
    config = flash_mosaic.redo_defaults(
        config, shape[-1], segments=bool(options.get("segment_ids"))
    )
    forward_read = not (config.redo_hidden and config.num_stages >= 2)
    backward_read = not (
        config.bwd_redo_hidden and config.bwd_num_stages >= 2 and not config.bwd_fused_dq
    )
    reads = 0 if case == "plain_h64" else forward_read + (grad and native_backward) * backward_read
    assert text.count("stablehlo.is_finite") == reads, case


def test_fused_dq_backward_under_vmap_lowers_for_cuda(monkeypatch):
    """The GPU path of the fused backward under jax.vmap: dQ as a run_state Ref inside
    folding_vmap's custom_vmap (stop 33's jax.new_ref there failed this lowering: no state
    discharge rule), one dk/dv kernel over the folded batch, no dq kernel."""
    monkeypatch.setattr(flash_mosaic.common, "interpret_mode", lambda: False)
    config = dataclasses.replace(FUSED_H128, bwd_dkdv_stages=None)
    q = jax.ShapeDtypeStruct((3, 2, 256, 4, 128), jnp.bfloat16)  # [V, B, T, N, H]
    k = jax.ShapeDtypeStruct((3, 2, 384, 2, 128), jnp.bfloat16)

    def loss(q, k, v):
        out = jattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="mosaic", config=config
        )
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))
    text = export.export(jax.jit(grads), platforms=["cuda"])(q, k, k).mlir_module()
    calls = re.findall(r"stablehlo\.custom_call @(\S+?)\(", text)
    assert calls.count("mosaic_gpu_v2") == 2, calls  # the forward and the fused dk/dv kernel
    assert "tensor<6x384x4x128xbf16>" in text  # dK per query head over V * B = 6 rows


@pytest.mark.parametrize("head_dim", [128, 256])
def test_persistent_grid_and_named_barrier_lower_for_cuda(head_dim, monkeypatch):
    """The GPU path of the schedule options: the named barrier's inline PTX, the persistent
    grid of one program per SM (132 without a device to ask) and, at H=256, O in Q's buffer;
    the softmax overlap's two wgmma in flight (`wgmma_accumulator_load(wait_n=1)`)."""
    monkeypatch.setattr(flash_mosaic.common, "interpret_mode", lambda: False)
    config = dataclasses.replace(
        flash_mosaic.default_config(head_dim),
        persistent=True,
        named_barrier=True,
        softmax_overlap=True,
    )
    q = jax.ShapeDtypeStruct((2, 1000, 8, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 1300, 2, head_dim), jnp.bfloat16)

    def run(q, k, v):
        return jattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="mosaic", config=config
        )

    text = export.export(jax.jit(run), platforms=["cuda"])(q, k, k).mlir_module()
    assert "bar.sync 4, 256;" in text  # the turns: both consumer warpgroups at barrier 4


def test_lowering_rejects_what_does_not_fit(monkeypatch):
    """The lowering is a real check: a config over the shared memory limit fails there."""
    monkeypatch.setattr(flash_mosaic, "shared_memory_estimate", lambda *a: 0)  # skip our check
    monkeypatch.setattr(flash_mosaic.common, "interpret_mode", lambda: False)
    monkeypatch.setattr(
        flash_mosaic,
        "default_config",
        lambda *a, **k: jattn.MosaicConfig(block_q=128, block_kv=256, num_stages=4),
    )
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        _lower((1, 256, 256, 2, 2, 256), {})


# --- on a Hopper GPU ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_every_feature_matches_oracle(rng, feature, dtype):
    shape = (2, 1000, 1300, 8, 2, 128)
    if feature.startswith("bias") or feature == "mask":
        shape = (1, 300, 520, 4, 2, 72)  # the float64 oracle holds [B, N, T, S]
    check_against_oracle(rng, shape, make_options(rng, feature, shape), dtype, "mosaic")


def _shipped_forward_configs(device: str = "nvidia_h200") -> dict[str, jattn.MosaicConfig]:
    """{bucket: config} of a shipped table's Mosaic entries, one per distinct forward config
    and head dim (the backward fields left at their defaults)."""
    from jattn.autotune import cache

    table = next(p for p in cache.shipped_tables() if p.name == f"{device}.json")
    seen, out = set(), {}
    for bucket, entry in cache.load(table).items():
        forward = {k: v for k, v in entry.config.items() if not k.startswith("bwd_")}
        key = (bucket.head_dim, tuple(sorted(forward.items())))
        if bucket.implementation == "mosaic" and key not in seen:
            seen.add(key)
            out[str(bucket)] = jattn.MosaicConfig(**forward)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["causal_bottom_right", "lengths_empty"])
@pytest.mark.parametrize(
    "bucket, config", list(_shipped_forward_configs().items()), ids=list(_shipped_forward_configs())
)
def test_gpu_every_shipped_forward_config_matches_oracle(rng, bucket, config, feature):
    """The tuner times its candidates without checking them: each forward config the H200
    table ships (stop 35 retuned them) against the oracle, at its bucket's head dim, with
    T != S and GQA (bottom-right causal), and with padding lengths that empty every row of a
    batch."""
    head_dim = int(bucket.split("H=")[1].split()[0])
    shape = (2, 700, 900, 4, 2, head_dim)
    options = make_options(rng, feature, shape)
    check_against_oracle(rng, shape, options, jnp.bfloat16, "mosaic", config, gradients=False)


@pytest.mark.gpu
@pytest.mark.parametrize("head_split", [False, True], ids=["triton_backward", "split"])
def test_gpu_head_dim_256_backward(rng, head_split):
    """H > 128: the Mosaic forward's out and lse feed the Triton backward, or with
    bwd_head_split the dk/dv kernel with dK and dV split by columns over its consumers."""
    shape = (2, 700, 900, 4, 2, 256)
    options = make_options(rng, "causal_bottom_right", shape)
    config = dataclasses.replace(flash_mosaic.default_config(256), bwd_head_split=head_split)
    check_against_oracle(rng, shape, options, jnp.bfloat16, "mosaic", config)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feature, dtype",
    [("segments_causal_lengths", jnp.bfloat16), ("window", jnp.float16), ("soft_cap", jnp.float16)],
)
def test_gpu_head_dim_256_dq_half_keys(rng, feature, dtype, monkeypatch):
    """H = 256: the dq kernel's one stage of 64-key tiles runs as two stages of 32 keys
    (`DQ_HALF_KEYS`, every operand at a 64-byte swizzle): key segment ids, edges, window and
    soft cap on 32-key tiles, float16, checked to take that ring."""
    dq_rings = _dq_rings(monkeypatch)
    shape = (2, 700, 900, 4, 2, 256)
    options = make_options(rng, feature, shape)
    check_against_oracle(rng, shape, options, dtype, "mosaic", flash_mosaic.default_config(256))
    assert set(dq_rings) == {(32, 2)}, dq_rings


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feature, head_dim",
    [
        ("causal_bottom_right", 64),
        ("segments_causal_lengths", 128),
        ("lengths_empty", 64),
        ("window", 256),  # on by default there since stop 45 (dQ bit-identical in its A/B)
    ],
)
def test_gpu_backward_with_paired_products(rng, feature, head_dim, monkeypatch):
    """Paired products compiled (two wgmma in flight, one wait) at the tuned configs."""
    pairs = _paired_products(monkeypatch)
    shape = (2, 700, 900, 4, 2, head_dim)
    options = make_options(rng, feature, shape)
    check_against_oracle(rng, shape, options, jnp.bfloat16, "mosaic")
    assert pairs


@pytest.mark.gpu
def test_gpu_fused_dq_backward_under_vmap(rng, monkeypatch):
    """The same folding compiled: dQ as a run_state Ref under jax.vmap at H = 64 (where the
    fused backward measured fastest), many key programs adding into each query row."""
    config = dataclasses.replace(  # a float32 bias rides along: its tiles must fit too
        flash_mosaic.default_config(64, pair_itemsize=4), bwd_fused_dq=True, bwd_dkdv_stages=None
    )
    _check_vmap_folding(rng, monkeypatch, (2, 700, 900, 4, 2, 64), config, exact=False)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feature, head_dim",
    [("causal_bottom_right", 64), ("segments_causal_lengths", 128), ("window", 256)],
)
def test_gpu_fused_dq_backward(rng, feature, head_dim):
    """bwd_fused_dq on the GPU: dQ added up by TMA reduce-add stores from the dk/dv kernel
    (a jax.new_ref zeroed first), at sizes where many key programs add into each query row."""
    shape = (2, 700, 900, 4, 2, head_dim)
    config = dataclasses.replace(
        flash_mosaic.default_config(head_dim), bwd_fused_dq=True, bwd_dkdv_stages=None
    )
    options = make_options(rng, feature, shape)
    check_against_oracle(rng, shape, options, jnp.bfloat16, "mosaic", config)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_gpu_head_dims_long_sequence(rng, head_dim):
    q, k, v = make_inputs(rng, (1, 4096, 4096, 8, 8, head_dim), jnp.bfloat16)
    got = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic")
    want = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla_chunked")
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.bfloat16])


def test_autotune_search_space_fits_shared_memory_and_registers():
    from jattn.autotune import cache

    tunable = cache.get_tunable("mosaic")
    forward = (flash_mosaic.shared_memory_estimate, flash_mosaic.register_tiles)
    backward = (flash_mosaic.backward_shared_memory_estimate, flash_mosaic.backward_register_tiles)
    limits = {"forward": forward, "schedule": forward, "backward": backward}
    assert [search.name for search in tunable.searches] == list(limits)
    for head_dim in (64, 128, 256):
        bucket = cache.bucket_for(
            "mosaic", head_dim=head_dim, dtype="bfloat16", causal=True, length=4096
        )
        base = tunable.default(bucket)
        for search in tunable.searches:
            candidates = search.candidates(bucket, base)
            assert candidates, (head_dim, search.name)
            memory, registers = limits[search.name]
            for config in candidates:
                assert flash_mosaic.fits_shared_memory(memory(config, head_dim, 0)), config
                assert flash_mosaic.fits_registers(registers(config, head_dim)), config


def test_a_tuned_config_too_big_for_the_bias_tiles_gives_way_to_the_default():
    """The tables are tuned without bias/mask; their tiles must not make a call with a float32
    bias decline (or an explicit implementation="mosaic" fail)."""
    tuned = jattn.MosaicConfig(block_q=128, block_kv=128, num_stages=4)  # the H=64 table's pick
    assert flash_mosaic.choose_config(tuned, 64, 0) == tuned
    with_bias = flash_mosaic.choose_config(tuned, 64, 4)
    assert with_bias == flash_mosaic.default_config(64, 4)
    assert flash_mosaic.fits_shared_memory(flash_mosaic.shared_memory_estimate(with_bias, 64, 4))
    assert flash_mosaic.choose_config(None, 128, 0) == flash_mosaic.default_config(128)
