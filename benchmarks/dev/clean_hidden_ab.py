"""A/B of `mosaic_common.CLEAN_HIDDEN` (issue 19): the Mosaic kernels with the masked tiles'
K and V cleaned by the producer (a NaN in a hidden key reaches no row) against the same kernels
without, beside cuDNN, in one process (each setting compiled ahead of time right after it is
set, with JAX's caches cleared). "clean_unflagged": the cleaning kernels without
`flag_nonfinite`'s reads of K and V (the kernels' structure alone; wrong for non-finite
inputs). bf16, H = 128, B = 16k / T, N = 16: causal, segment ids (4 documents) and a sliding
window; forward and forward+backward.

Run: python -m benchmarks.dev.clean_hidden_ab --json OUT.json [--lengths 4096 16384]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jattn
from benchmarks import flash
from pallas_kernels import flash_mosaic, flash_mosaic_bwd, mosaic_common

CELLS = {
    "causal": lambda t: dict(is_causal=True),
    "segments": lambda t: dict(segment_ids=(jnp.arange(t) // (t // 4),) * 2),
    "window": lambda t: dict(is_causal=True, local_window_size=(1024, 0)),
}


FLAG_NONFINITE = mosaic_common.flag_nonfinite


def _unread(st, bounds, *arrays):
    """flag_nonfinite without its reads of K and V: the kernels' cleaning structure alone."""
    return bounds


def compiled(fn, args):
    """fn compiled ahead of time under the current setting, with JAX's caches cleared first:
    jattn's inner jit is cached by its arguments, not by a module switch (before stop 33 this
    A/B timed the first setting's kernels under both names)."""
    jax.clear_caches()
    fn = fn.lower(*args).compile()
    jax.block_until_ready(fn(*args))
    return fn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    args = parser.parse_args(argv)
    rows = []
    for length in args.lengths:
        batch, heads = flash.TOKENS // length, flash.HIDDEN // 128
        shape = (batch, length, heads, 128)
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
        for cell in args.cells:
            options = CELLS[cell](length)
            if "segment_ids" in options:
                options["segment_ids"] = tuple(
                    jnp.tile(s[None], (batch, 1)) for s in options["segment_ids"]
                )
            for mode in args.modes:
                fns = {}
                for name, impl, clean in (
                    ("dirty", "mosaic", False),
                    ("clean", "mosaic", True),
                    ("clean_unflagged", "mosaic", True),  # no flag_nonfinite reads (timing)
                    ("cudnn", "cudnn", True),
                ):
                    mosaic_common.CLEAN_HIDDEN = clean
                    unflagged = name == "clean_unflagged"
                    for module in (flash_mosaic, flash_mosaic_bwd):
                        module.flag_nonfinite = _unread if unflagged else FLAG_NONFINITE

                    def peer(q, k, v, causal, impl=impl, options=options):
                        return jattn.dot_product_attention(q, k, v, implementation=impl, **options)

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
                cell_fields = dict(cell=cell, length=length, mode=mode)
                flash.record_together(fns, (q, k, v), args.repeats, cell_fields, rows, args.json)


if __name__ == "__main__":
    main()
