"""A/B of `mosaic_common.FOLD_SCALE` (issue 14): the Mosaic forward with its row max taken on
q.k and the scale folded into exp2's argument (one FFMA per score element, as FlashAttention-3
and tokamax) against the scale multiplied into the tile first (an extra FMUL per element; stop
34's SASS mix: 9.1 instructions per score element against tokamax's 7.8), beside cuDNN and
tokamax, in one process (each setting compiled ahead of time with JAX's caches cleared).
bf16, FlashAttention shapes (B = 16k / T, hidden 2048).

Run: python -m benchmarks.dev.fold_scale_ab --json OUT.json [--head-dims 64 128 256]
"""

from __future__ import annotations

import argparse

import jattn
from benchmarks import flash
from benchmarks.dev.clean_hidden_ab import compiled
from pallas_kernels import mosaic_common


def _mosaic(q, k, v, causal):
    return jattn.dot_product_attention(q, k, v, is_causal=causal, implementation="mosaic")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--modes", nargs="+", default=["fwd"])
    parser.add_argument("--peers", nargs="+", default=["cudnn", "tokamax_mosaic"])
    args = parser.parse_args(argv)
    rows = []
    for head_dim in args.head_dims:
        for length in args.lengths:
            q, k, v = flash.qkv(length, head_dim)
            for causal in (False, True):
                for mode in args.modes:
                    fns = {}
                    runs = [("folded", _mosaic, True), ("unfolded", _mosaic, False)]
                    runs += [(name, flash.PEERS[name], True) for name in args.peers]
                    for name, peer, fold in runs:
                        mosaic_common.FOLD_SCALE = fold
                        try:
                            fns[name] = compiled(flash.timed_fn(peer, q, causal, mode), (q, k, v))
                        except Exception as e:  # a peer that declines the cell
                            print(name, head_dim, length, causal, type(e).__name__, str(e)[:200])
                    mosaic_common.FOLD_SCALE = True
                    cell = dict(head_dim=head_dim, length=length, causal=causal, mode=mode)
                    flash.record_together(fns, (q, k, v), args.repeats, cell, rows, args.json)


if __name__ == "__main__":
    main()
