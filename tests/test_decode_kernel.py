"""The split-KV decode kernel (`implementation='triton'`) against the float64 oracle.

On CPU the kernel runs in Pallas interpret mode (small shapes); `-m gpu` runs real sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.decode import DecodeConfig
from pallas_kernels import decode as decode_kernel

import oracle
from cases import TOLERANCE, assert_close


def _inputs(rng, batch, heads, kv_heads, dim, capacity, dtype):
    q = jnp.asarray(rng.standard_normal((batch, heads, dim)), dtype)
    k = rng.standard_normal((batch, capacity, kv_heads, dim))
    v = rng.standard_normal((batch, capacity, kv_heads, dim))
    return q, k, v


def _poison_past(cache, lengths):
    """NaN in every entry past a sequence's length: the kernel must never let them in."""
    cache = cache.copy()
    for b, n in enumerate(lengths):
        cache[b, n:] = np.nan
    return cache


def _check(out, lse, q, k, v, lengths, dtype, scale=None):
    want_out, want_lse = oracle.decode(
        np.asarray(q.astype(jnp.float32)),
        np.nan_to_num(np.asarray(jnp.asarray(k, dtype).astype(jnp.float32))),
        np.nan_to_num(np.asarray(jnp.asarray(v, dtype).astype(jnp.float32))),
        lengths,
        scale=scale,
    )
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == jnp.float32
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, want_out, TOLERANCE[dtype])
    empty = np.asarray(lengths) == 0
    assert np.isneginf(np.asarray(lse)[empty]).all()
    assert (np.asarray(out, np.float32)[empty] == 0).all()
    assert_close(lse[~empty], want_lse[~empty], TOLERANCE[jnp.float32])


# (B, N, K, H, S, num_splits, block_k, unmasked_body, dtype): GQA 1/4/8/16 (16 fills the packed
# tile exactly), odd S, a padded head dim (24 -> 32), one split and many, both loop structures,
# three dtypes (interpret mode is slow: each case is one combination, not a full product).
SHAPES = [
    (3, 8, 2, 16, 37, 3, 16, False, jnp.float32),
    (3, 8, 2, 16, 37, 3, 16, True, jnp.bfloat16),
    (2, 4, 4, 32, 50, 1, 16, False, jnp.float16),
    (2, 4, 4, 32, 50, 2, 16, True, jnp.float32),
    (2, 8, 1, 24, 33, 4, 16, True, jnp.float16),
    (3, 16, 1, 64, 64, None, 64, False, jnp.bfloat16),
]


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "B{}N{}K{}H{}S{}s{}b{}u{:d}-{}".format(*s[:-1], s[-1].__name__)
)
def test_contiguous_matches_oracle(rng, shape):
    batch, heads, kv_heads, dim, capacity, splits, block_k, unmasked_body, dtype = shape
    q, k, v = _inputs(rng, batch, heads, kv_heads, dim, capacity, dtype)
    lengths = np.concatenate([[0, capacity], rng.integers(1, capacity, batch)])[:batch]
    k, v = _poison_past(k, lengths), _poison_past(v, lengths)
    out, lse = jattn.decode_attention(
        q,
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        lengths,
        return_residual=True,
        implementation="triton",
        config=DecodeConfig(
            block_k=block_k, num_splits=splits, min_split=16, unmasked_body=unmasked_body
        ),
    )
    _check(out, lse, q, k, v, lengths, dtype)


def test_scale_soft_cap_and_traced_lengths_match_reference(rng):
    q, k, v = _inputs(rng, 2, 4, 2, 16, 40, jnp.float32)
    k, v = jnp.asarray(4 * k, jnp.float32), jnp.asarray(v, jnp.float32)
    options = dict(scale=0.3, logits_soft_cap=5.0)

    @jax.jit
    def run(lengths):  # lengths traced: the kernel clips, never reads past S
        return jattn.decode_attention(
            q, k, v, lengths, implementation="triton", return_residual=True, **options
        )

    lengths = jnp.array([17, 40])
    got, got_lse = run(lengths)
    want, want_lse = jattn.decode_attention(
        q, k, v, lengths, implementation="xla", return_residual=True, **options
    )
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.float32])
    assert_close(got_lse, np.asarray(want_lse, np.float64), TOLERANCE[jnp.float32])


@pytest.mark.parametrize("page_size, dtype", [(8, jnp.float32), (16, jnp.bfloat16)])
def test_paged_matches_oracle(rng, page_size, dtype):
    batch, heads, kv_heads, dim, pages, pool = 3, 8, 2, 32, 4, 16
    q = jnp.asarray(rng.standard_normal((batch, heads, dim)), dtype)
    k_pool = rng.standard_normal((pool, page_size, kv_heads, dim))
    v_pool = rng.standard_normal((pool, page_size, kv_heads, dim))
    table = rng.permutation(pool)[: batch * pages].reshape(batch, pages)
    lengths = np.array([0, page_size + 3, pages * page_size])
    # Pages no sequence uses, and slots past each length, hold NaN.
    used = np.zeros(pool, bool)
    k_contig = np.zeros((batch, pages * page_size, kv_heads, dim))
    v_contig = np.zeros_like(k_contig)
    for b in range(batch):
        for i in range(-(-lengths[b] // page_size)):
            used[table[b, i]] = True
        k_contig[b] = k_pool[table[b]].reshape(-1, kv_heads, dim)
        v_contig[b] = v_pool[table[b]].reshape(-1, kv_heads, dim)
    k_pool[~used] = np.nan
    v_pool[~used] = np.nan
    last = table[1, 1]  # sequence 1 ends 3 slots into its second page
    k_pool[last, 3:] = np.nan
    v_pool[last, 3:] = np.nan
    table[0] = 10**6  # sequence 0 is empty: its table row is never read
    out, lse = jattn.decode_attention(
        q,
        jnp.asarray(k_pool, dtype),
        jnp.asarray(v_pool, dtype),
        lengths,
        page_table=table,
        return_residual=True,
        implementation="triton",
        config=DecodeConfig(num_splits=2, unmasked_body=page_size == 16),
    )
    _check(out, lse, q, k_contig, v_contig, lengths, dtype)
    xla = jattn.decode_attention(
        q,
        jnp.asarray(np.nan_to_num(k_pool), dtype),
        jnp.asarray(np.nan_to_num(v_pool), dtype),
        lengths,
        page_table=np.where(table >= pool, 0, table),
        implementation="xla",
    )
    assert_close(out, np.asarray(xla.astype(jnp.float32), np.float64), TOLERANCE[dtype])


def test_all_empty_is_zero_not_nan(rng):
    q, k, v = _inputs(rng, 2, 4, 1, 16, 20, jnp.float32)
    out, lse = jattn.decode_attention(
        q, k, v, np.array([0, 0]), return_residual=True, implementation="triton"
    )
    assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()


def test_split_heuristic_fills_the_gpu_and_respects_min_split():
    config = DecodeConfig()
    assert decode_kernel.num_splits(1, 8, 131072, 64, config) * 8 >= 4 * decode_kernel.sm_count()
    assert decode_kernel.num_splits(512, 8, 1024, 64, config) == 1
    assert decode_kernel.num_splits(1, 1, 1024, 64, config) == 1024 // config.min_split
    assert decode_kernel.num_splits(1, 1, 100, 64, DecodeConfig(num_splits=8)) == 2


def test_merge_partials_ignores_empty_parts():
    out = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 4)), jnp.float32)
    lse = jnp.array([[0.5, -jnp.inf], [-jnp.inf, -jnp.inf], [1.0, -jnp.inf]])  # [splits, rows]
    merged, merged_lse = decode_kernel.merge_partials(out, lse, axis=-3)
    assert np.isfinite(np.asarray(merged)).all()
    assert_close(merged_lse[0], np.logaddexp(0.5, 1.0), (1e-6, 1e-6))
    assert np.isneginf(np.asarray(merged_lse[1])) and (np.asarray(merged[1]) == 0).all()
    w = np.exp(np.array([0.5, 1.0]) - np.logaddexp(0.5, 1.0))
    assert_close(merged[0], w[0] * out[0, 0] + w[1] * out[2, 0], (1e-6, 1e-6))


@pytest.mark.parametrize(
    "lengths, table, message",
    [
        (np.array([1, -1]), None, r"lengths must lie in \[0, S = 20\]"),
        (np.array([1, 21]), None, r"\[1, 21\]"),
        (np.array([1, 17]), np.array([[0, 1], [2, 3]]), r"lengths must lie in \[0, S = 16\]"),
        (np.array([1, 9]), np.array([[0, 1], [2, 5]]), r"page_table entries in use"),
        (np.array([1, 9]), np.array([0, 1]), r"page_table must be \[B, pages\]"),
    ],
)
def test_bad_lengths_and_page_tables_raise(rng, lengths, table, message):
    q, k, v = _inputs(rng, 2, 4, 1, 16, 20, jnp.float32)
    if table is not None:  # a pool of 5 pages of 8 slots
        k, v = k[:, :20].reshape(5, 8, 1, 16), v[:, :20].reshape(5, 8, 1, 16)
    with pytest.raises(ValueError, match=message):
        jattn.decode_attention(q, k, v, lengths, page_table=table, implementation="triton")


def test_auto_uses_xla_without_a_gpu(rng, monkeypatch):
    q, k, v = _inputs(rng, 2, 4, 1, 16, 20, jnp.float32)
    calls = []
    monkeypatch.setattr(decode_kernel, "decode_attention", lambda *a, **kw: calls.append(1))
    jattn.decode_attention(q, k, v, np.array([3, 4]))
    assert calls == [] or jax.default_backend() == "gpu"


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [8, 1])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("unmasked_body", [False, True])
def test_gpu_real_sizes(rng, kv_heads, paged, unmasked_body):
    batch, heads, dim, capacity, page_size = 4, 32 if kv_heads == 8 else 8, 128, 32768, 64
    q = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.bfloat16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    k = jax.random.normal(key, (batch, capacity, kv_heads, dim), jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 1), k.shape, jnp.bfloat16)
    lengths = jnp.array([0, 1, 20001, capacity])
    table = None
    if paged:
        pages = capacity // page_size
        perm = jax.random.permutation(jax.random.fold_in(key, 2), batch * pages)
        table = perm.reshape(batch, pages)
        pool_k = jnp.zeros_like(k).reshape(-1, page_size, kv_heads, dim)
        pool_k = pool_k.at[table.reshape(-1)].set(k.reshape(-1, page_size, kv_heads, dim))
        pool_v = jnp.zeros_like(v).reshape(-1, page_size, kv_heads, dim)
        pool_v = pool_v.at[table.reshape(-1)].set(v.reshape(-1, page_size, kv_heads, dim))
    got, lse = jattn.decode_attention(
        q,
        pool_k if paged else k,
        pool_v if paged else v,
        lengths,
        page_table=table,
        return_residual=True,
        implementation="triton",
        config=DecodeConfig(unmasked_body=unmasked_body, programs_per_sm=16),
    )
    want, want_lse = jattn.decode_attention(
        q.astype(jnp.float32),
        k.astype(jnp.float32),
        v.astype(jnp.float32),
        lengths,
        return_residual=True,
        implementation="xla",
    )
    assert_close(got, np.asarray(want, np.float64), TOLERANCE[jnp.bfloat16])
    assert_close(lse[1:], np.asarray(want_lse[1:], np.float64), (1e-2, 1e-2))
    assert (np.asarray(got[0], np.float32) == 0).all()


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_traced_page_table_out_of_range_gives_nan_for_that_sequence(rng, implementation):
    """One documented behaviour: the read is clamped into the pool (never outside it) and the
    sequence whose in-use entry is out of range gets NaN output and lse; the others are exact."""
    q, k, v = _inputs(rng, 3, 4, 2, 16, 16, jnp.float32)
    pool = jnp.asarray(np.concatenate([k, v]).reshape(6, 16, 2, 16)[:4], jnp.float32)
    lengths = jnp.array([20, 5, 30], jnp.int32)
    table = jnp.array([[0, 9], [-3, 1], [2, 3]], jnp.int32)  # 0: page 9 > P, 1: -3 in use
    run = jax.jit(
        lambda table: jattn.decode_attention(
            q,
            pool,
            pool,
            lengths,
            page_table=table,
            return_residual=True,
            implementation=implementation,
        )
    )
    out, lse = run(table)
    assert bool(jnp.isnan(out[:2]).all()) and bool(jnp.isnan(lse[:2]).all())
    want_out, want_lse = jattn.decode_attention(
        q,
        pool,
        pool,
        lengths,
        page_table=jnp.array([[0, 1], [1, 1], [2, 3]]),
        return_residual=True,
        implementation="xla",
    )
    assert_close(out[2], np.asarray(want_out[2], np.float64), TOLERANCE[jnp.float32])
    assert_close(lse[2], np.asarray(want_lse[2], np.float64), TOLERANCE[jnp.float32])
    out, _ = run(jnp.array([[0, 9], [1, 2], [2, 3]]))  # page 9 unused by sequence 1: fine
    assert bool(jnp.isfinite(out[1:]).all())


@pytest.mark.parametrize("implementation", ["xla", "triton", None])
@pytest.mark.parametrize(
    "shape",  # (B, S, N, K, H) with one size 0
    [(2, 0, 4, 2, 8), (0, 6, 4, 2, 8), (2, 6, 0, 2, 8)],
    ids=["S=0", "B=0", "N=0"],
)
def test_empty_shapes_are_served_alike(implementation, shape):
    batch, capacity, heads, kv_heads, dim = shape
    q = jnp.ones((batch, heads, dim))
    cache = jnp.ones((batch, capacity, kv_heads, dim))
    out, lse = jattn.decode_attention(
        q,
        cache,
        cache,
        jnp.zeros((batch,), jnp.int32),
        return_residual=True,
        implementation=implementation,
    )
    np.testing.assert_array_equal(np.asarray(out), np.zeros(q.shape))
    np.testing.assert_array_equal(np.asarray(lse), np.full(q.shape[:2], -np.inf))
    with pytest.raises(ValueError, match="head dim H must be >= 1"):
        jattn.decode_attention(
            jnp.ones((2, 4, 0)), jnp.ones((2, 6, 2, 0)), jnp.ones((2, 6, 2, 0)), jnp.ones(2, int)
        )
