"""A/B of a `flash_mosaic` or `flash_mosaic_bwd` module switch on jattn's mosaic path (its
tuned config), beside cuDNN, in one process: each value of the switch is compiled ahead of time
right after it is set, with JAX's caches cleared (jattn's inner jits are cached by their
arguments, not by a module switch), then all are timed together in rounds. Records the largest
difference of each value's dQ (forward+backward) or output (forward) from the first value's.
bf16, FlashAttention shapes (B = 16k / T, hidden 2048). Stop 41: BACKWARD_LONGEST_FIRST.

Run: python -m benchmarks.dev.switch_ab --json OUT.json --switch BACKWARD_LONGEST_FIRST \
       --values False True --head-dims 64 128 256 --lengths 2048 16384 --causal 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

from benchmarks import flash
from benchmarks.dev.fused_dq_ab import _literal  # a switch value: a Python literal, or text
from jattn import autotune
from pallas_kernels import flash_mosaic, flash_mosaic_bwd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--switch", default="BACKWARD_LONGEST_FIRST")
    parser.add_argument("--values", nargs="+", default=["False", "True"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--causal", type=int, nargs="+", default=[1])
    parser.add_argument("--mode", default="fwd+bwd", choices=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--config",
        default=None,
        help="MosaicConfig fields as JSON, set on each cell's tuned config (jattn mosaic only)",
    )
    args = parser.parse_args(argv)
    fields = json.loads(args.config) if args.config else None
    module = flash_mosaic if hasattr(flash_mosaic, args.switch) else flash_mosaic_bwd
    default = getattr(module, args.switch)
    rows = []
    for head_dim in args.head_dims:
        for length in args.lengths:
            for causal in map(bool, args.causal):
                q, k, v = flash.qkv(length, head_dim)
                mosaic = flash.PEERS["jattn_mosaic"]
                if fields:
                    mosaic = flash._jattn("mosaic", _tuned(head_dim, length, causal, fields))
                peers = {f"mosaic_{value}": (mosaic, value)
                         for value in map(_literal, args.values)}  # fmt: skip
                peers["cudnn"] = (flash.PEERS["cudnn"], default)
                fns, first = {}, {}
                for name, (peer, value) in peers.items():
                    setattr(module, args.switch, value)
                    jax.clear_caches()
                    try:
                        fn = flash.timed_fn(peer, q, causal, args.mode).lower(q, k, v).compile()
                        result = jax.block_until_ready(fn(q, k, v))
                    except Exception as error:  # noqa: BLE001 (a variant that cannot run)
                        print(json.dumps(dict(peer=name, error=str(error)[:300])), flush=True)
                        continue
                    first[name] = jax.tree.leaves(result)[0].astype(jnp.float32)
                    fns[name] = fn
                setattr(module, args.switch, default)
                names = [n for n in first if n != "cudnn"]
                reference = first[names[0]] if names else None
                diffs = {n: float(jnp.max(jnp.abs(first[n] - reference))) for n in names[1:]}
                cell = dict(head_dim=head_dim, length=length, causal=causal, mode=args.mode,
                            switch=args.switch, config=fields, max_abs_diff=diffs)  # fmt: skip
                flash.record_together(fns, (q, k, v), args.repeats, cell, rows, args.json)


def _tuned(head_dim: int, length: int, causal: bool, fields: dict):
    """The config `config=None` takes for a bf16 cell (`autotune.resolve`), with `fields`
    replaced."""
    bucket = autotune.bucket_for(
        "mosaic", head_dim=head_dim, dtype=jnp.bfloat16, causal=causal, length=length
    )
    config, _ = autotune.resolve(bucket)
    return dataclasses.replace(config, **fields)


if __name__ == "__main__":
    main()
