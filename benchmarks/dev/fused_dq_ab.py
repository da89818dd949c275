"""A/B of a `flash_mosaic_bwd` module switch of the fused-dQ backward (issue 14): each value
of the switch (`COOPERATIVE_DQ`: the widest head part whose consumers meet, e.g. 128 / 0;
stop 33's `DQ_ADD`, since removed) beside the two-kernel backward and cuDNN,
forward+backward in one process, with each setting's largest dQ difference from the two-kernel
backward's (a wrong variant shows there). Each setting is compiled ahead of time right after it
is set, with JAX's caches cleared: jattn's inner jits are cached by their arguments, not by a
module switch, so before stop 33 every setting ran the first one's kernel. bf16,
FlashAttention shapes (B = 16k / T, hidden 2048).

Run: python -m benchmarks.dev.fused_dq_ab --json OUT.json --switch COOPERATIVE_DQ --values 128 0
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json

import jax
import jax.numpy as jnp

from benchmarks import flash, mosaic_variants
from pallas_kernels import flash_mosaic, flash_mosaic_bwd


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--switch", default="COOPERATIVE_DQ")
    parser.add_argument("--values", nargs="+", default=["128", "0"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    default = getattr(flash_mosaic_bwd, args.switch)
    rows = []
    for head_dim in args.head_dims:
        for length in args.lengths:
            for causal in map(bool, args.causal):
                batch, heads = flash.TOKENS // length, flash.HIDDEN // head_dim
                shape = (batch, length, heads, head_dim)
                q, k, v = (
                    jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3)
                )
                base = flash_mosaic.default_config(head_dim, causal=causal)
                fused = dataclasses.replace(base, bwd_fused_dq=True, bwd_dkdv_stages=None)
                peers = {"two_kernels": (mosaic_variants._mosaic(base), default)}
                for value in map(_literal, args.values):
                    peers[f"fused_{value}"] = (mosaic_variants._mosaic(fused), value)
                peers["cudnn"] = (flash.PEERS["cudnn"], default)
                fns, dq = {}, {}
                for name, (peer, value) in peers.items():
                    setattr(flash_mosaic_bwd, args.switch, value)
                    jax.clear_caches()  # jattn's inner jits would reuse another setting's trace
                    try:  # traced and compiled ahead of time under the setting
                        fn = flash.timed_fn(peer, q, causal, "fwd+bwd").lower(q, k, v).compile()
                        dq[name] = jax.block_until_ready(fn(q, k, v))[0].astype(jnp.float32)
                    except Exception as error:  # noqa: BLE001 (a variant that cannot run)
                        print(json.dumps(dict(peer=name, error=str(error)[:300])), flush=True)
                        continue
                    fns[name] = fn
                setattr(flash_mosaic_bwd, args.switch, default)
                reference = dq.pop("two_kernels")
                errors = {n: float(jnp.max(jnp.abs(g - reference))) for n, g in dq.items()}
                cell = dict(head_dim=head_dim, length=length, causal=causal,
                            dq_max_abs=float(jnp.max(jnp.abs(reference))),
                            dq_max_abs_diff=errors)  # fmt: skip
                flash.record_together(fns, (q, k, v), args.repeats, cell, rows, args.json)


if __name__ == "__main__":
    main()
