"""A/B of two versions of the TSSA kernel module in one process (issue 15 development probe):
dw checked against the reference for each, then forward + backward times (y and dw returned).

Run: python -m benchmarks.dev.tssa_ab --modules pallas_kernels.tssa OTHER --json OUT.json
"""

from __future__ import annotations

import argparse
import importlib
import json

import jax
import jax.numpy as jnp

from benchmarks.tssa_variants import BATCH_FOR, _inputs, _jit, _rel, _time
from jattn import reference
from jattn.demo import environment


def _op(module, temperature, causal, bias):
    """w -> TSSA of `module` (a kernel module, or jattn.reference) with these options."""
    return lambda w: module.token_statistics_attention(
        w, temperature, causal=causal, denom_bias=bias
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=[16384, 65536, 262144])
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    modules = {name: importlib.import_module(name) for name in args.modules}
    rows = []
    w, temperature, bias = _inputs(2, 4099, jnp.float32, seed=3)
    dy = jax.random.normal(jax.random.key(4), w.shape, w.dtype)
    for causal in (False, True):
        b = bias if causal else None
        ref = _jit(_op(reference, temperature, causal, b), grad=True)(w, dy)
        for name, mod in modules.items():
            got = _jit(_op(mod, temperature, causal, b), grad=True)(w, dy)
            rows.append(
                dict(
                    check=True,
                    module=name,
                    causal=causal,
                    y_err=_rel(got[0], ref[0]),
                    dw_err=_rel(got[1], ref[1]),
                )
            )
            print(rows[-1], flush=True)
    for length in args.lengths:
        batch = BATCH_FOR.get(length, 1)
        w, temperature, bias = _inputs(batch, length, jnp.bfloat16)
        dy = jnp.ones_like(w)
        for causal in (False, True):
            b = bias if causal else None
            for name, mod in modules.items():
                fn = _jit(_op(mod, temperature, causal, b), grad=True)
                rows.append(
                    dict(T=length, B=batch, causal=causal, module=name, ms=_time(fn, w, dy))
                )
                print(rows[-1], flush=True)
    with open(args.json, "w") as f:
        json.dump(dict(environment=environment(), rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
