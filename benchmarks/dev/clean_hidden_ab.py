"""A/B of the masked tiles' cleaning (issue 19): "dirty", the Mosaic kernels without it
(`mosaic_common.CLEAN_HIDDEN` False: a NaN in a hidden key can reach a row), against "clean",
the kernels with the cleaning compiled in (it runs for flagged batch rows only, stop 33), and
"redo" (`MosaicConfig.redo_hidden` on the call's tuned config: no flag read; a consumer redoes
the rows that went non-finite; stop 37) and "redo_bwd" (bwd_redo_hidden too: the dq kernel
likewise; stop 38; forward+backward only), beside cuDNN, in one process (each setting compiled
ahead of time right after it is set, with JAX's caches cleared; compile seconds recorded too).
Finite inputs; bf16, B = 16k / T, N = 2048 / H: causal, segment ids (4 documents) and a sliding
window; forward and forward+backward. (Stop 36 also timed a lax.cond between the two kernels on
the flags here, and stop 37 a check of each masked tile in the kernel instead of the flag read,
"checked": NOTES.)

Run: python -m benchmarks.dev.clean_hidden_ab --json OUT.json [--lengths 4096 16384] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

import jattn
from benchmarks import flash, flash_features
from jattn.autotune import cache as autotune
from pallas_kernels import flash_mosaic, mosaic_common

CELLS = {
    "causal": lambda t: dict(is_causal=True),
    "segments": lambda t: dict(segment_ids=(jnp.arange(t) // (t // 4),) * 2),
    "window": lambda t: dict(is_causal=True, local_window_size=(1024, 0)),
    # the features table's segment-id row: causal, 4 unequal documents (stop 39: its forward
    # was 0.722 ms with the redo against 0.667 with the cleaning, a run apart)
    "segments_causal": lambda t: dict(
        is_causal=True, segment_ids=(flash_features._segments(1, t)[0],) * 2
    ),
}


def causal_of(options: dict) -> bool:
    return bool(options.get("is_causal", False))


COMPILE_S = {}  # compiled function -> seconds to lower, compile and run it once

SETTINGS = {  # name: (implementation, CLEAN_HIDDEN, MosaicConfig fields set on the call's config)
    "dirty": ("mosaic", False, {}),
    "clean": ("mosaic", True, dict(redo_hidden=False, bwd_redo_hidden=False)),
    "redo": ("mosaic", True, dict(redo_hidden=True, bwd_redo_hidden=False)),
    "redo_bwd": ("mosaic", True, dict(redo_hidden=True, bwd_redo_hidden=True)),
    "cudnn": ("cudnn", True, {}),
}


def compiled(fn, args):
    """fn compiled ahead of time under the current setting, with JAX's caches cleared first:
    jattn's inner jit is cached by its arguments, not by a module switch (before stop 33 this
    A/B timed the first setting's kernels under both names)."""
    jax.clear_caches()
    start = time.perf_counter()
    fn = fn.lower(*args).compile()
    jax.block_until_ready(fn(*args))
    COMPILE_S[fn] = time.perf_counter() - start
    return fn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = parser.parse_args(argv)
    rows = []
    for length in args.lengths:
        q, k, v = flash.qkv(length, args.head_dim)
        batch = q.shape[0]
        for cell in args.cells:
            options = CELLS[cell](length)
            if "segment_ids" in options:
                options["segment_ids"] = tuple(
                    jnp.tile(s[None], (batch, 1)) for s in options["segment_ids"]
                )
            for mode in args.modes:
                fns = {}
                for name, (impl, clean, fields) in SETTINGS.items():
                    if name not in args.settings or (name == "redo_bwd" and mode == "fwd"):
                        continue
                    mosaic_common.CLEAN_HIDDEN = clean
                    config = None
                    if fields:  # the call's own config (tuned or default), the fields set
                        config = dataclasses.replace(
                            flash_mosaic.choose_config(
                                autotune.lookup_call("mosaic", q, k, causal=causal_of(options)),
                                args.head_dim,
                                0,
                                causal_of(options),
                            ),
                            **fields,
                        )

                    def peer(q, k, v, causal, impl=impl, options=options, config=config):
                        return jattn.dot_product_attention(
                            q, k, v, implementation=impl, config=config, **options
                        )

                    try:
                        fns[name] = compiled(flash.timed_fn(peer, q, False, mode), (q, k, v))
                    except Exception as e:  # cuDNN declines some cells
                        rows.append(
                            dict(
                                cell=cell,
                                length=length,
                                mode=mode,
                                peer=name,
                                error=f"{type(e).__name__}: {str(e)[:200]}",
                            )
                        )
                mosaic_common.CLEAN_HIDDEN = True
                cell_fields = dict(cell=cell, length=length, mode=mode, head_dim=args.head_dim)
                for name, fn in fns.items():
                    rows.append(dict(cell_fields, peer=name, compile_s=COMPILE_S[fn]))
                flash.record_together(fns, (q, k, v), args.repeats, cell_fields, rows, args.json)


if __name__ == "__main__":
    main()
