"""TSSA kernel variants on one GPU, in one process: correctness, then forward times per config.

A development probe for issue 15 (the numbers of each kernel version go to benchmarks/NOTES.md):
the causal forward as three launches vs one launch with decoupled look-back, tilings of both,
the non-causal forward, the XLA reference, and a device copy as the roofline. Shape: N=8 heads x
H=64, bfloat16; GB/s counts one read of w and one write of y.

Run: python -m benchmarks.tssa_variants --json OUT.json [--lengths 4096 65536 ...]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jattn import reference
from jattn.demo import environment, median_ms
from pallas_kernels import tssa as kernels

HEADS, HEAD_DIM = 8, 64
BATCH_FOR = {4096: 8, 16384: 4, 65536: 2, 262144: 1, 1048576: 1}


def _time(fn, *args, inner: int = 10) -> float:
    """Median ms of one call, each sample `inner` calls queued back to back (no host gaps)."""
    jax.block_until_ready(fn(*args))

    def run():
        out = None
        for _ in range(inner):
            out = fn(*args)
        return out

    return median_ms(run, 15) / inner


def _inputs(batch, length, dtype, seed=0):
    key = jax.random.key(seed)
    w = jax.random.normal(key, (batch, length, HEADS, HEAD_DIM), dtype)
    temperature = jnp.linspace(0.5, 1.5, HEADS, dtype=jnp.float32)
    bias = 0.01 * jax.random.normal(jax.random.key(seed + 1), (HEADS, length), jnp.float32)
    return w, temperature, bias


def _jit(f, grad: bool):
    """jit of w -> f(w), or with `grad` of (w, dy) -> (y, dw): forward and backward (the vjp;
    y is returned, as a training step uses it, so its pass is not dead code)."""
    if not grad:
        return jax.jit(f)

    def f_bwd(w, dy):
        y, vjp = jax.vjp(f, w)
        return y, vjp(dy)[0]

    return jax.jit(f_bwd)


def _kernel(temperature, causal, bias, config, grad=False):
    def f(w):
        return kernels.token_statistics_attention(
            w, temperature, causal=causal, denom_bias=bias, config=config
        )

    return _jit(f, grad)


def _xla(temperature, causal, bias, grad=False):
    def f(w):
        return reference.token_statistics_attention(w, temperature, causal=causal, denom_bias=bias)

    return _jit(f, grad)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check(rows) -> None:
    """Every variant against the XLA reference (float32 math on the same values), twice."""
    for dtype, shape in ((jnp.float32, (2, 4099, 8, 64)), (jnp.bfloat16, (1, 262144, 8, 64))):
        w, temperature, bias = _inputs(shape[0], shape[1], dtype, seed=7)
        for causal in (False, True):
            b = bias if causal else None
            want = reference.token_statistics_attention(
                w.astype(jnp.float32), temperature, causal=causal, denom_bias=b
            )
            for config in (
                kernels.Config(),
                kernels.Config(store_pi=True),
                kernels.Config(single_pass=True),
            ):
                if not causal and config.single_pass:
                    continue  # the non-causal forward has no one-launch variant
                fn = _kernel(temperature, causal, b, config)
                first, second = fn(w), fn(w)
                rows.append(
                    dict(
                        check=True,
                        dtype=jnp.dtype(dtype).name,
                        shape=shape,
                        causal=causal,
                        config=repr(config),
                        rel_err=_rel(first.astype(jnp.float32), want),
                        rerun_diff=_rel(first.astype(jnp.float32), second.astype(jnp.float32)),
                        finite=bool(jnp.isfinite(first).all()),
                    )
                )
                print(rows[-1], flush=True)


def check_grads(rows, configs) -> None:
    """dw of each config against the reference's, float32, causal and not (vjp of a random dy)."""
    w, temperature, bias = _inputs(2, 4099, jnp.float32, seed=3)
    dy = jax.random.normal(jax.random.key(4), w.shape, w.dtype)
    for causal in (False, True):
        b = bias if causal else None
        want = _xla(temperature, causal, b, grad=True)(w, dy)[1]
        for name, config in configs:
            got = _kernel(temperature, causal, b, config, grad=True)(w, dy)[1]
            rows.append(
                dict(
                    check="grad",
                    causal=causal,
                    name=name,
                    config=repr(config),
                    rel_err=_rel(got, want),
                    finite=bool(jnp.isfinite(got).all()),
                )
            )
            print(rows[-1], flush=True)


def sweep(rows, lengths, configs, grad=False) -> None:
    """Forward (or with `grad` forward + backward) times; TB/s counts one read of w and one
    write of y (with `grad` also one read of w and dy and one write of dw)."""
    for length in lengths:
        batch = BATCH_FOR.get(length, 1)
        w, temperature, bias = _inputs(batch, length, jnp.bfloat16)
        args = (w, jnp.ones_like(w)) if grad else (w,)
        nbytes = (5 if grad else 2) * w.nbytes
        for causal in (False, True):
            b = bias if causal else None
            ref = _xla(temperature, causal, b, grad)
            candidates = [("xla", None, ref)]
            for name, config in configs:
                if not causal and config.single_pass:
                    continue  # causal-only options
                fn = _kernel(temperature, causal, b, config, grad)
                candidates.append((name, config, fn))
            for name, config, fn in candidates:
                try:
                    ms = _time(fn, *args)
                except Exception as err:  # noqa: BLE001  (record a config that fails to compile)
                    rows.append(dict(T=length, causal=causal, name=name, error=repr(err)[:300]))
                    print(rows[-1], flush=True)
                    continue
                rows.append(
                    dict(
                        T=length,
                        B=batch,
                        causal=causal,
                        grad=grad,
                        name=name,
                        config=repr(config),
                        ms=ms,
                        tbps=nbytes / ms / 1e9,
                    )
                )
                print(
                    f"T={length} causal={causal} {name:24s} {ms:8.3f} ms "
                    f"{rows[-1]['tbps']:.2f} TB/s",
                    flush=True,
                )


CONFIGS = {
    "default": kernels.Config(),
    "b8_w4": kernels.Config(block_t=8, num_warps=4),  # the default before stop 29 (backward too)
    "exact_reciprocal": kernels.Config(approx_reciprocal=False),  # range-checked 1 / x (< stop 29)
    "stored_pi": kernels.Config(store_pi=True),
    "stored_pi_b16_w8": kernels.Config(block_t=16, num_warps=8, store_pi=True),
    "b16_w8": kernels.Config(block_t=16, num_warps=8),
    "b4": kernels.Config(block_t=4),
    "b4_w2": kernels.Config(block_t=4, num_warps=2),
    "b2_w1": kernels.Config(block_t=2, num_warps=1),  # whole token rows in one warp
    "w8": kernels.Config(num_warps=8),
    "stored_pi_b4": kernels.Config(block_t=4, store_pi=True),
    "bwd_b8_w4": kernels.Config(backward_block_t=8, backward_num_warps=4),  # before 2026-11-30
    "bwd_b4_w2": kernels.Config(backward_block_t=4, backward_num_warps=2),
    "bwd_b2_w1": kernels.Config(backward_block_t=2, backward_num_warps=1),
    "bwd_b4_w1": kernels.Config(backward_block_t=4, backward_num_warps=1),
    "bwd_b2_w2": kernels.Config(backward_block_t=2, backward_num_warps=2),
    "bwd_b1_w1": kernels.Config(backward_block_t=1, backward_num_warps=1),
    "bwd_b8_w2": kernels.Config(backward_num_warps=2),
    "bwd_b16_w4": kernels.Config(backward_block_t=16),
    "one_launch_c128": kernels.Config(block_t=8, chunk_t=128, single_pass=True),
    "one_launch_c256": kernels.Config(block_t=8, chunk_t=256, single_pass=True),
    # the look-back forward on stop 29's forward tile (4 tokens, 2 warps) and reciprocals
    "one_launch_b4_c64": kernels.Config(chunk_t=64, single_pass=True),
    "one_launch_b4_c128": kernels.Config(chunk_t=128, single_pass=True),
    "one_launch_b4_c256": kernels.Config(chunk_t=256, single_pass=True),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 65536, 262144, 1048576])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--grad", action="store_true", help="time forward + backward")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    x = jnp.ones((1 << 28,), jnp.float32)
    copy_ms = _time(jax.jit(lambda x: x * 2.0), x)
    copy_tbps = 2 * x.nbytes / copy_ms / 1e9
    print(f"copy {copy_tbps:.2f} TB/s", flush=True)
    chosen = [(name, CONFIGS[name]) for name in args.configs]
    if not args.no_check:
        check(rows)
        if args.grad:
            check_grads(rows, chosen)
    sweep(rows, args.lengths, chosen, args.grad)
    record = dict(environment=environment(), copy_tbps=copy_tbps, rows=rows)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1, default=str)


if __name__ == "__main__":
    main()
