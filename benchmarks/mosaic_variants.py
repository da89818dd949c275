"""Mosaic GPU forward variants on one GPU, in one process: correctness, then forward (or
forward+backward) TFLOP/s of each variant beside cuDNN and tokamax in the same cell.

A development probe for issue 14 (each version's numbers go to benchmarks/NOTES.md): the
schedule options of `MosaicConfig` (persistent grid, named-barrier turns, the softmax overlap),
one at a time and together, on the default tiles of each head dim. FlashAttention's shapes
(16k tokens, hidden 2048), bf16; FLOPs by the FlashAttention convention (`benchmarks.flash`).

Run: python -m benchmarks.mosaic_variants --json OUT.json [--head-dims 64 128 256]
     [--variants base overlap] [--mode fwd+bwd]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from benchmarks import flash
from jattn import reference
from jattn.demo import environment
from pallas_kernels import flash_mosaic

VARIANTS = {  # on default_config: early_k_wait and longest_first on since 2026-11-30 (NOTES)
    "base": {},
    "named_barrier": dict(named_barrier=True),
    "persistent": dict(persistent=True),
    "persistent_named": dict(persistent=True, named_barrier=True),
    "overlap": dict(softmax_overlap=True),
    "overlap_named": dict(softmax_overlap=True, named_barrier=True),
    "overlap_persistent": dict(softmax_overlap=True, persistent=True, named_barrier=True),
    # the backward (time with --mode fwd+bwd): dK, dV split by columns above H = 128, the default
    # there since 2026-11-30 (a 2-stage dk/dv ring); bwd_triton: unsplit, the Triton backward
    "bwd_triton": dict(bwd_head_split=False, bwd_dkdv_stages=None),
    "bwd_split": dict(bwd_head_split=True, bwd_dkdv_stages=None),
    "bwd_split_dkdv2": dict(bwd_head_split=True, bwd_dkdv_stages=2),
    "overlap_bwd_split": dict(softmax_overlap=True, bwd_head_split=True),
    # one backward kernel, dQ by TMA reduce-add (its dS and dQ tiles leave dk/dv 1 ring stage
    # at H = 256: the dk/dv ring at the backward's depth)
    "bwd_fused": dict(bwd_fused_dq=True, bwd_dkdv_stages=None),
    # no flag read for hidden keys' NaN/inf: a consumer redoes rows that went non-finite (the
    # forward's; the dq kernel's); left None "base" takes `flash_mosaic.redo_defaults` (stop 38)
    "redo_hidden": dict(redo_hidden=True),
    "bwd_redo_hidden": dict(redo_hidden=True, bwd_redo_hidden=True),
    "clean_hidden": dict(redo_hidden=False, bwd_redo_hidden=False),  # the producers' cleaning
    # H = 64: the forward's redo on 128-key tiles (default_config's 256 spill with it, stop 38)
    "redo_hidden_bk128": dict(block_kv=128, num_stages=2, redo_hidden=True),
    "clean_hidden_bk128": dict(block_kv=128, num_stages=2, redo_hidden=False),
    # the H200 table's H = 64 causal T <= 4096 entry since stop 39 (the redo on by the rule):
    # two score tiles with the softmax overlap, so its ptxas spills want a look
    "redo_hidden_bk128_overlap": dict(
        block_kv=128, num_stages=2, persistent=True, softmax_overlap=True, redo_hidden=True
    ),
}


def configs(head_dim: int, extra: dict[str, dict]) -> dict[str, jattn.MosaicConfig]:
    """The variants on `default_config(head_dim)` without the overlap, dropping those that do
    not fit shared memory; `extra`: more {name: changes} (other tilings)."""
    base = dataclasses.replace(flash_mosaic.default_config(head_dim), softmax_overlap=False)
    out = {}
    for name, changes in {**VARIANTS, **extra}.items():
        config = dataclasses.replace(base, **changes)
        if flash_mosaic.fits_shared_memory(
            flash_mosaic.shared_memory_estimate(config, head_dim, 0)
        ):
            out[name] = config
    return out


def _mosaic(config):
    def run(q, k, v, causal, **options):
        return jattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="mosaic", config=config, **options
        )

    return run


def check(head_dims, extra) -> list[dict]:
    """Every variant's forward against the float32 reference: causal bottom-right with T != S,
    padding lengths with an empty query row, segments with a window and soft cap, GQA."""
    rows = []
    rng = np.random.default_rng(0)
    for head_dim in head_dims:
        b, t, s, n, kv = 2, 1000, 1300, 8, 2
        q = jnp.asarray(rng.standard_normal((b, t, n, head_dim)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((b, s, kv, head_dim)), jnp.bfloat16) for _ in "kv")
        seg_q = jnp.asarray(np.sort(rng.integers(0, 3, (b, t))), jnp.int32)
        seg_k = jnp.asarray(np.sort(rng.integers(0, 3, (b, s))), jnp.int32)
        cases = {
            "causal": dict(causal=True),
            "full_lengths": dict(
                causal=False,
                query_seq_lengths=jnp.array([1000, 0], jnp.int32),
                key_value_seq_lengths=jnp.array([700, 1300], jnp.int32),
            ),
            "segments_window_softcap": dict(
                causal=True,
                segment_ids=(seg_q, seg_k[:, :t]),
                local_window_size=(200, 0),
                logits_soft_cap=20.0,
            ),
        }
        for case, options in cases.items():
            causal = options.pop("causal")
            keys = k[:, :t] if "segment_ids" in options else k
            values = v[:, :t] if "segment_ids" in options else v
            upcast = [x.astype(jnp.float32) for x in (q, keys, values)]
            want = reference.dot_product_attention(*upcast, is_causal=causal, **options)
            for name, config in configs(head_dim, extra).items():
                row = dict(head_dim=head_dim, case=case, variant=name)
                try:
                    got = _mosaic(config)(q, keys, values, causal, **options)
                    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
                    row.update(max_abs_err=err, ok=bool(err < 0.03))
                except Exception as e:
                    row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def time_cells(args, extra, on_row) -> list[dict]:
    rows = []
    peers = {"cudnn": flash.PEERS["cudnn"], "tokamax_mosaic": flash.PEERS["tokamax_mosaic"]}
    for head_dim in args.head_dims:
        variants = {f"jattn_{n}": _mosaic(c) for n, c in configs(head_dim, extra).items()}
        for length in args.lengths:
            for causal in (False, True):
                batch, heads = flash.TOKENS // length, flash.HIDDEN // head_dim
                keys = jax.random.split(jax.random.key(length + head_dim), 3)
                shape = (batch, length, heads, head_dim)
                q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
                flops = flash.forward_flops(batch, heads, length, length, head_dim, causal)
                flops *= 1.0 if args.mode == "fwd" else 3.5  # backward 2.5x forward
                everyone = {**variants, **peers}  # timed in rounds: `flash.time_ms_together`
                results = flash.measure_together(everyone, q, k, v, causal, args.mode, args.repeats)
                for name, result in results.items():
                    row = dict(
                        peer=name, head_dim=head_dim, length=length, causal=causal, mode=args.mode
                    )
                    if isinstance(result, str):
                        row.update(error=result)
                    else:
                        row.update(ms=result, tflops=flops / result / 1e9)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                on_row(rows)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mode", default="fwd", choices=["fwd", "fwd+bwd"])
    parser.add_argument("--variants", nargs="+", help="names to run (default: all)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    # H=64 on the H100 tuned to 64 x 256 key tiles, 3 stages (NOTES): tried here on the H200.
    extra = {}
    if 64 in args.head_dims:
        extra = {
            "k256_s3_persistent": dict(block_kv=256, num_stages=3, persistent=True),
            "q128_k128_s3_persistent": dict(block_q=128, num_stages=3, persistent=True),
            # two 64 x 256 score tiles do not fit a consumer's registers beside O
            "overlap_k128": dict(softmax_overlap=True, block_kv=128, num_stages=2),
            "overlap_k128_s3": dict(softmax_overlap=True, block_kv=128, num_stages=3),
        }
    if not args.variants and args.mode == "fwd":  # the backward's options change no forward
        args.variants = [name for name in {**VARIANTS, **extra} if "bwd" not in name]
    if args.variants:
        unknown = set(args.variants) - set(VARIANTS) - set(extra)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {[*VARIANTS, *extra]}")
        for table in (VARIANTS, extra):
            for name in set(table) - set(args.variants):
                del table[name]
    report = dict(environment=environment(), variants={**VARIANTS, **extra})

    def save(rows=None, key="timings"):
        if rows is not None:
            report[key] = rows
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    if not args.skip_check:
        save(check(args.head_dims, extra), "checks")
    save(time_cells(args, extra, save))


if __name__ == "__main__":
    main()
