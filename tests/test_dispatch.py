"""Measured dispatch (`jattn.autotune.dispatch`): the shipped H200 table is what the committed
benchmark runs give, and `implementation=None` tries a bucket's measured kernels first."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jattn
from jattn import attention
from jattn.autotune import cache, dispatch

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
H200_RUNS = [
    RESULTS / "flash_h200_bf16_fwd_stop46.json",
    RESULTS / "flash_h200_bf16_fwdbwd_stop46.json",
]


def test_shipped_h200_table_is_rebuilt_from_the_committed_runs():
    from benchmarks import dispatch_table

    assert dispatch_table.main(["--check", *map(str, H200_RUNS)]) == 0


@pytest.mark.parametrize(
    ("head_dim", "causal", "length", "differentiated", "first"),
    [
        (128, True, 16384, False, "mosaic"),  # 614 vs 517 TFLOP/s (geometric mean, T=8k, 16k)
        (128, True, 16384, True, "cudnn"),  # forward+backward: 493 vs 455 (stop 36)
        (128, False, 16384, False, "mosaic"),  # 620 vs 592 since the folded scale (stop 35)
        (128, True, 1024, False, "mosaic"),  # 309 vs 290 on the persistent grid (stop 40)
        (256, True, 2048, False, "mosaic"),
        (96, True, 8192, False, "mosaic"),  # H=96 is bucket 128
        (64, False, 16384, False, "mosaic"),  # 470 vs 445 (stop 35)
        (64, True, 4096, False, "cudnn"),  # 362 vs 340
        (64, True, 1024, True, "mosaic"),  # forward+backward, T <= 1k: 192 vs 186 (stop 38)
        (128, True, 4096, True, "mosaic"),  # 401 vs 397 with the dq kernel's redo (stop 38)
    ],
)
def test_measured_order_of_a_bucket(head_dim, causal, length, differentiated, first):
    order = dispatch.measured_order(
        device="nvidia_h200",
        dtype=jnp.bfloat16,
        head_dim=head_dim,
        causal=causal,
        length=length,
        differentiated=differentiated,
    )
    assert order[0] == first and set(order) == {"cudnn", "mosaic"}


def test_unmeasured_buckets_and_devices_have_no_order():
    common = dict(head_dim=128, causal=True, length=4096, differentiated=False)
    assert dispatch.measured_order(device="nvidia_h200", dtype=jnp.float32, **common) is None
    assert (
        dispatch.measured_order(device="nvidia_h100_80gb_hbm3", dtype=jnp.bfloat16, **common)
        is None
    )


def test_float16_takes_the_bfloat16_order_which_its_own_runs_agree_with():
    """A float16 call has no entries of its own and ranks as bfloat16 does; in the float16 run
    at H = 128 (stop 37, 10 cells; the causal forward+backward ones again in stop 38, after the
    dq kernel's redo, and the causal forward at 1k in stop 40, after its retune) the faster of
    cuDNN and mosaic is that order's first."""
    report = json.loads((RESULTS / "flash_h200_f16_h128_stop40.json").read_text())
    cells = {}
    for row in report["rows"]:
        key = (row["length"], row["causal"], row["mode"] == "fwd+bwd")
        cells.setdefault(key, {})[row["peer"]] = row.get("ms")
    assert len(cells) >= 10
    for (length, causal, differentiated), ms in cells.items():
        common = dict(head_dim=128, causal=causal, length=length, differentiated=differentiated)
        order = dispatch.measured_order(device="nvidia_h200", dtype=jnp.float16, **common)
        assert order == dispatch.measured_order(device="nvidia_h200", dtype=jnp.bfloat16, **common)
        faster = "mosaic" if ms["jattn_mosaic"] < ms["cudnn"] else "cudnn"
        assert order[0] == faster, (length, causal, differentiated, ms)


def test_merge_puts_the_measured_first_and_keeps_the_fallbacks():
    default = ("cudnn", "mosaic", "triton", "xla_chunked", "xla")
    assert dispatch.merge(("mosaic", "cudnn"), default) == (
        "mosaic",
        "cudnn",
        "triton",
        "xla_chunked",
        "xla",
    )
    assert dispatch.merge(None, default) == default
    assert dispatch.merge(("mosaic", "unregistered"), ("cudnn", "mosaic")) == ("mosaic", "cudnn")


def test_build_ranks_by_geometric_mean_and_drops_failed_cells():
    def row(peer, length, tflops, mode="fwd", head_dim=128):
        return dict(
            peer=peer,
            head_dim=head_dim,
            length=length,
            causal=True,
            mode=mode,
            dtype="bfloat16",
            tflops=tflops,
        )

    rows = [
        row("cudnn", 2048, 400.0),
        row("cudnn", 4096, 500.0),
        row("jattn_mosaic", 2048, 300.0),
        row("jattn_mosaic", 4096, 700.0),  # gm 458 > 447
        row("tokamax_mosaic", 2048, 900.0),  # not an implementation auto can call
        # H=64: mosaic failed one cell, so cuDNN alone qualifies: no entry
        row("cudnn", 2048, 400.0, head_dim=64),
        row("jattn_mosaic", 2048, None, head_dim=64),
    ]
    table = dispatch.build([dict(device="gpu (X)", rows=rows)], device="x")
    (entry,) = table["entries"]
    assert (entry["head_dim"], entry["lengths"], entry["mode"]) == (128, "<=4096", "forward")
    assert entry["order"] == ["mosaic", "cudnn"] and entry["measured_lengths"] == [2048, 4096]


def _args(length=16384, dtype=jnp.bfloat16, head_dim=128):
    q = jnp.zeros((1, length, 2, head_dim), dtype)
    return attention.check_attention_args(q, q, q, is_causal=True)


def test_auto_order_for_a_hopper_call_uses_the_table(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "hopper_or_newer", lambda: True)
    monkeypatch.setattr(cache, "device_kind", lambda: "nvidia_h200")
    registered = attention.auto_order()
    assert attention.auto_order_for(_args(), differentiated=False)[:2] == ("mosaic", "cudnn")
    assert attention.auto_order_for(_args(), differentiated=True)[:2] == ("cudnn", "mosaic")
    assert set(attention.auto_order_for(_args(), differentiated=False)) == set(registered)
    half = attention.auto_order_for(_args(dtype=jnp.float16), differentiated=False)
    assert half[:2] == ("mosaic", "cudnn")  # bfloat16's order
    unmeasured = attention.auto_order_for(_args(dtype=jnp.float32), differentiated=False)
    assert unmeasured == registered


def test_auto_order_for_a_hopper_call_with_a_dense_bias_or_mask_tries_mosaic_first(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "hopper_or_newer", lambda: True)
    monkeypatch.setattr(cache, "device_kind", lambda: "nvidia_h200")
    q = jnp.zeros((1, 4096, 2, 128), jnp.bfloat16)
    bias = jnp.zeros((1, 2, 4096, 4096), jnp.bfloat16)
    mask = jnp.ones((1, 1, 4096, 4096), bool)
    for arrays in (dict(bias=bias), dict(mask=mask)):
        args = attention.check_attention_args(q, q, q, **arrays)
        for differentiated in (False, True):
            order = attention.auto_order_for(args, differentiated=differentiated)
            assert order[:2] == ("mosaic", "cudnn")
            assert set(order) == set(attention.auto_order())
    plain = attention.check_attention_args(q, q, q)  # the table's bucket: cuDNN first
    assert attention.auto_order_for(plain, differentiated=True)[0] == "cudnn"


def test_a_call_under_grad_is_dispatched_as_differentiated(rng, monkeypatch):
    seen = []

    def record(args, *, differentiated):
        seen.append(differentiated)
        return ("xla",)

    monkeypatch.setattr(attention, "auto_order_for", record)
    q = jnp.asarray(rng.standard_normal((1, 9, 2, 8)), jnp.float32)
    loss = lambda q: jnp.sum(jattn.dot_product_attention(q, q, q, is_causal=True))
    loss(q)
    jax.grad(loss)(q)
    assert seen == [False, True]
