"""A/B of `flash_mosaic_bwd.COOPERATIVE_DQ` (issue 14): the fused-dQ backward with the two
consumers' dS^T meeting and each computing one dQ chunk, against each consumer adding its own
keys' dS @ K, beside the two-kernel backward and cuDNN, forward+backward in one process (each
setting traced and compiled right after it is set). bf16, FlashAttention shapes (B = 16k / T,
hidden 2048).

Run: python -m benchmarks.dev.fused_dq_ab --json OUT.json [--head-dims 64 128] [--lengths ...]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import flash, mosaic_variants
from pallas_kernels import flash_mosaic, flash_mosaic_bwd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []
    for head_dim in args.head_dims:
        for length in args.lengths:
            for causal in (False, True):
                batch, heads = flash.TOKENS // length, flash.HIDDEN // head_dim
                shape = (batch, length, heads, head_dim)
                q, k, v = (
                    jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3)
                )
                base = flash_mosaic.default_config(head_dim, causal=causal)
                fused = dataclasses.replace(base, bwd_fused_dq=True, bwd_dkdv_stages=None)
                peers = {
                    "two_kernels": (mosaic_variants._mosaic(base), True),
                    "fused_own": (mosaic_variants._mosaic(fused), False),
                    "fused_cooperative": (mosaic_variants._mosaic(fused), True),
                    "cudnn": (flash.PEERS["cudnn"], True),
                }
                fns = {}
                for name, (peer, cooperative) in peers.items():
                    flash_mosaic_bwd.COOPERATIVE_DQ = cooperative
                    fn = flash.timed_fn(peer, q, causal, "fwd+bwd")
                    jax.block_until_ready(fn(q, k, v))  # traced and compiled under the setting
                    fns[name] = fn
                flash_mosaic_bwd.COOPERATIVE_DQ = True
                cell = dict(head_dim=head_dim, length=length, causal=causal)
                flash.record_together(fns, (q, k, v), args.repeats, cell, rows, args.json)


if __name__ == "__main__":
    main()
