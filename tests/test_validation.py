"""Integers and options out of range are checked, never wrapped; the config dataclasses validate
their fields; a config of another kernel is refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import reference
from jattn.attention import check_attention_args
from pallas_kernels.decode import DecodeConfig

import oracle
from cases import make_inputs

SMALL_TRITON = jattn.TritonConfig(block_q=16, block_k=16, bwd_block_q=16, bwd_block_k=16)
CPU_IMPLEMENTATIONS = {
    "xla": None,
    "xla_chunked": jattn.ChunkedConfig(block_q=8, block_k=8),
    "triton": SMALL_TRITON,
}
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)


# --- position arithmetic ----------------------------------------------------------------------


def _oracle_out(q, k, v, **options):
    """The float64 oracle (plain Python positions: no int32 anywhere)."""
    window = options.get("local_window_size")
    if isinstance(window, int):
        window = (window, window)
    visible = oracle.attention_visibility(
        q.shape[0],
        q.shape[2],
        q.shape[1],
        k.shape[1],
        is_causal=options.get("is_causal", False),
        q_offset=None if options.get("q_offset") is None else np.asarray(options["q_offset"]),
        window=window,
    )
    out, lse, _ = oracle.attention(q, k, v, visible=visible)
    return out, lse


# (is_causal, local_window_size, q_offset per batch of 2): offsets at and near the int32 limits,
# windows wider than any sequence, both together.
EXTREMES = {
    "causal_max_offset": (True, None, [INT32_MAX, INT32_MAX - 3]),
    "causal_min_offset": (True, None, [INT32_MIN, -5]),
    "window_max_offset": (False, (3, 2), [INT32_MAX, 20]),
    "huge_left_window": (False, (INT32_MAX, 1), [INT32_MAX, -3]),
    "huge_right_window": (False, (2, INT32_MAX), [INT32_MIN, 6]),
    "huge_window_causal": (True, (INT32_MAX, INT32_MAX), [INT32_MAX - 1, INT32_MIN + 2]),
    "wide_left_window_large_offset": (False, (2**31 - 10, 0), [2**31 - 5, 2**31 - 12]),
}


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", EXTREMES)
def test_extreme_offsets_and_windows_never_overflow(rng, implementation, case):
    """Before: q_offset = 2**31 - 1 with causal gave rows with lse -inf on every implementation
    (i + q_offset wrapped to negative positions)."""
    is_causal, window, offset = EXTREMES[case]
    q, k, v = make_inputs(rng, (2, 9, 12, 2, 1, 16))
    options = dict(is_causal=is_causal, local_window_size=window, q_offset=np.array(offset))
    want_out, want_lse = _oracle_out(*(np.asarray(x, np.float64) for x in (q, k, v)), **options)
    out, lse = jattn.dot_product_attention(
        q,
        k,
        v,
        return_residual=True,
        implementation=implementation,
        config=CPU_IMPLEMENTATIONS[implementation],
        **options,
    )
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_lse))
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=2e-5)


def test_canonical_positions_give_identical_masks_for_random_extremes(rng):
    """The rewrite of (q_offset, window) against the visibility computed in Python integers,
    over random offsets and windows of every magnitude (the int32 limits included)."""
    q_len, kv_len = 5, 7
    q, k = jnp.zeros((3, q_len, 1, 4)), jnp.zeros((3, kv_len, 1, 4))
    magnitudes = [0, 1, 3, 6, 11, 12, 13, 2**20, 2**31 - 20, 2**31 - 1]
    for _ in range(60):
        is_causal = bool(rng.integers(2))
        window = None
        if rng.integers(3):
            window = tuple(int(rng.choice(magnitudes)) for _ in range(2))
        offsets = [int(rng.choice(magnitudes)) * int(rng.choice([-1, 1])) for _ in range(3)]
        offsets = [min(max(o, INT32_MIN), INT32_MAX) for o in offsets]
        args = check_attention_args(
            q, k, k, is_causal=is_causal, local_window_size=window, q_offset=np.array(offsets)
        )
        got = reference.dot_product_attention(
            jnp.ones_like(q),
            k,
            k,
            is_causal=args.is_causal,
            local_window_size=args.local_window_size,
            q_offset=args.q_offset,
            return_residual=True,
        )[1]
        want = oracle.attention_visibility(
            3, 1, q_len, kv_len, is_causal=is_causal, q_offset=np.array(offsets), window=window
        ).any(axis=-1)  # [B, 1, T]: rows that see a key
        assert np.array_equal(np.isfinite(np.asarray(got)), np.moveaxis(want, 1, 2)), (
            is_causal,
            window,
            offsets,
        )
        visible = oracle.attention_visibility(
            3, 1, q_len, kv_len, is_causal=is_causal, q_offset=np.array(offsets), window=window
        )
        rewritten = oracle.attention_visibility(
            3,
            1,
            q_len,
            kv_len,
            is_causal=args.is_causal,
            q_offset=None if args.q_offset is None else np.asarray(args.q_offset),
            window=args.local_window_size,
        )
        assert np.array_equal(visible, rewritten), (is_causal, window, offsets)
        if args.q_offset is not None:
            assert np.abs(np.asarray(args.q_offset)).max() <= 3 * (q_len + kv_len)


# --- wide integers ----------------------------------------------------------------------------


def test_wide_integers_are_range_checked_not_wrapped(rng):
    """Before: a length of 2**32 + 3 became 3, segment id 2**32 + 1 aliased id 1."""
    q, k, v = make_inputs(rng, (2, 4, 6, 2, 2, 8))
    big = np.array([2**32 + 3, 2], np.int64)
    with pytest.raises(ValueError, match="key_value_seq_lengths must (fit int32|lie in)"):
        jattn.dot_product_attention(q, k, v, key_value_seq_lengths=big)
    with pytest.raises(ValueError, match="query_seq_lengths must (fit int32|lie in)"):
        jattn.dot_product_attention(q, k, v, query_seq_lengths=np.array([1, -(2**40)]))
    with pytest.raises(ValueError, match="q_offset must fit int32"):
        jattn.dot_product_attention(q, k, v, is_causal=True, q_offset=2**31)
    with pytest.raises(ValueError, match="q_offset must fit int32"):
        jattn.dot_product_attention(q, k, v, is_causal=True, q_offset=np.uint32(2**32 - 1))
    ids = np.zeros((2, 4), np.int64), np.full((2, 6), 2**32, np.int64)
    with pytest.raises(ValueError, match="segment_ids must fit int32"):
        jattn.dot_product_attention(q, k, v, segment_ids=ids)
    # int64 values that fit are served exactly
    lengths = np.array([3, 6], np.int64)
    got = jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
    want = reference.dot_product_attention(q, k, v, key_value_seq_lengths=lengths.astype(np.int32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_traced_int64_saturates_instead_of_wrapping(rng):
    q, k, v = make_inputs(rng, (1, 4, 6, 2, 2, 8))
    with jax.enable_x64(True):

        @jax.jit
        def run(offset):
            return jattn.dot_product_attention(q, k, v, is_causal=True, q_offset=offset)

        got = run(jnp.array([2**32], jnp.int64))  # wraps to 0 when cast; saturates to 2**31 - 1
    want = reference.dot_product_attention(q, k, v)  # every key visible
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(scale=float("nan")), "scale must be finite"),
        (dict(scale=float("inf")), "scale must be finite"),
        (dict(scale="0.5"), "scale must be a real number"),
        (dict(scale=True), "scale must be a real number"),
        (dict(logits_soft_cap=float("inf")), "logits_soft_cap must be finite"),
        (dict(logits_soft_cap=0.0), "logits_soft_cap must be > 0"),
        (dict(logits_soft_cap=-1.0), "logits_soft_cap must be > 0"),
        (dict(is_causal="no"), "is_causal must be a bool"),
        (dict(is_causal=1), "is_causal must be a bool"),
        (dict(is_causal=None), "is_causal must be a bool"),
        (dict(local_window_size=True), "local_window_size must be"),
        (dict(local_window_size=(3, False)), "local_window_size must be"),
        (dict(local_window_size=(3, -1)), "local_window_size must be"),
        (dict(local_window_size=2.0), "local_window_size must be"),
    ],
)
def test_bad_options_raise_value_error(rng, options, message):
    q, k, v = make_inputs(rng, (1, 4, 6, 2, 2, 8))
    with pytest.raises(ValueError, match=message):
        jattn.dot_product_attention(q, k, v, **options)


def test_bool_like_options_that_are_fine(rng):
    q, k, v = make_inputs(rng, (1, 4, 6, 2, 2, 8))
    want = reference.dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    for is_causal in (True, np.bool_(True), jnp.asarray(True)):
        got = jattn.dot_product_attention(q, k, v, is_causal=is_causal, scale=np.float32(0.5))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_decode_checks_wide_integers_and_options(rng):
    q = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32)
    with pytest.raises(ValueError, match="lengths must fit int32"):
        jattn.decode_attention(q, k, k, np.array([2**32 + 3, 2], np.int64))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, S"):
        jattn.decode_attention(q, k, k, np.array([7, 2], np.int64))
    with pytest.raises(ValueError, match="scale must be finite"):
        jattn.decode_attention(q, k, k, np.array([3, 2]), scale=float("nan"))
    with pytest.raises(ValueError, match="logits_soft_cap must be finite"):
        jattn.decode_attention(q, k, k, np.array([3, 2]), logits_soft_cap=float("inf"))
    with pytest.raises(ValueError, match="takes a DecodeConfig, got a TritonConfig"):
        jattn.decode_attention(q, k, k, np.array([3, 2]), config=jattn.TritonConfig())


# --- configs ----------------------------------------------------------------------------------

BAD_CONFIGS = [
    (jattn.ChunkedConfig, dict(block_q=0), "block_q must be >= 1"),
    (jattn.ChunkedConfig, dict(block_k=-4), "block_k must be >= 1"),
    (jattn.ChunkedConfig, dict(block_k=8.0), "block_k must be an int"),
    (jattn.ChunkedConfig, dict(block_q=True), "block_q must be an int"),
    (jattn.TritonConfig, dict(block_q=24), "power of two"),
    (jattn.TritonConfig, dict(block_k=64.0), "block_k must be an int"),
    (jattn.TritonConfig, dict(num_stages=0), "num_stages must be >= 1"),
    (jattn.TritonConfig, dict(num_warps=3), "num_warps must be 1, 2, 4, 8 or 16"),
    (jattn.MosaicConfig, dict(block_q=64.0), "block_q must be an int"),
    (jattn.MosaicConfig, dict(block_kv=96), "multiple of 64"),
    (jattn.MosaicConfig, dict(num_stages=0), "num_stages must be >= 1"),
    (jattn.MosaicConfig, dict(schedule_barrier=1), "schedule_barrier must be a bool"),
    (DecodeConfig, dict(block_k=0), "block_k must be >= 1"),
    (DecodeConfig, dict(block_k=48), "block_k must be a power of two"),
    (DecodeConfig, dict(block_k=8), "block_k must be >= 16"),
    (DecodeConfig, dict(num_splits=0), "num_splits must be >= 1"),
    (DecodeConfig, dict(num_splits=2.5), "num_splits must be an int"),
    (DecodeConfig, dict(programs_per_sm=0), "programs_per_sm must be >= 1"),
    (DecodeConfig, dict(min_split=-1), "min_split must be >= 1"),
    (DecodeConfig, dict(num_warps=6), "num_warps must be 1, 2, 4, 8 or 16"),
    (DecodeConfig, dict(unmasked_body="yes"), "unmasked_body must be a bool"),
]


@pytest.mark.parametrize(
    "config_type, fields, message", BAD_CONFIGS, ids=lambda x: getattr(x, "__name__", None)
)
def test_configs_validate_at_construction(config_type, fields, message):
    """Before: zero, negative or float fields were accepted and failed deep inside a kernel
    (ZeroDivisionError, slice-size TypeErrors)."""
    with pytest.raises(ValueError, match=message):
        config_type(**fields)
    default = config_type()  # the defaults are valid, and replace() validates too
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(default, **fields)


def test_another_kernels_config_is_refused_by_name(rng):
    """Before: `AttributeError: 'TritonConfig' object has no attribute 'num_splits'` and the
    like, or a NotImplementedError from every implementation."""
    q, k, v = make_inputs(rng, (1, 8, 8, 2, 2, 16))
    with pytest.raises(ValueError, match="'xla_chunked' takes a ChunkedConfig, got a TritonConfig"):
        jattn.dot_product_attention(
            q, k, v, implementation="xla_chunked", config=jattn.TritonConfig()
        )
    with pytest.raises(ValueError, match="'triton' takes a TritonConfig, got a ChunkedConfig"):
        jattn.dot_product_attention(q, k, v, implementation="triton", config=jattn.ChunkedConfig())
    with pytest.raises(ValueError, match="'mosaic' takes a MosaicConfig, got a TritonConfig"):
        jattn.dot_product_attention(q, k, v, implementation="mosaic", config=jattn.TritonConfig())
    with pytest.raises(ValueError, match="'xla' takes no config, got a ChunkedConfig"):
        jattn.dot_product_attention(q, k, v, implementation="xla", config=jattn.ChunkedConfig())
    with pytest.raises(ValueError, match="must be one of .*got a DecodeConfig"):
        jattn.dot_product_attention(q, k, v, config=DecodeConfig())
    with pytest.raises(ValueError, match="must be one of .*got a dict"):
        jattn.dot_product_attention(q, k, v, config={"block_q": 16})
    if jax.default_backend() != "gpu":  # auto does not try the Triton kernel off the GPU
        with pytest.raises(ValueError, match="TritonConfig.*pass implementation='triton'"):
            jattn.dot_product_attention(q, k, v, config=SMALL_TRITON)
    # auto with a config tries only the implementation the config belongs to
    got = jattn.dot_product_attention(q, k, v, config=jattn.ChunkedConfig(block_k=4))
    want = reference.dot_product_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
