"""`jattn demo`: what jattn does, run on this machine in a few seconds.

Part `attention`: every available implementation of `dot_product_attention` on one shape,
checked against the reference (forward and gradients) and timed.
"""

import dataclasses
import datetime
import json
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattn import reference
from jattn.attention import available_implementations, dot_product_attention

DEMO_PARTS = ("attention",)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    batch: int = 2
    length: int = 512
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    causal: bool = True
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Row:
    implementation: str
    status: str  # "ok" or the reason it declined / failed
    max_error: float | None = None  # forward, vs the reference
    max_grad_error: float | None = None  # dq, dk, dv, vs the reference
    forward_ms: float | None = None
    backward_ms: float | None = None  # forward + backward


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() in ms, after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_attention_demo(shape: AttentionShape, repeats: int = 5) -> list[Row]:
    keys = jax.random.split(jax.random.key(0), 4)
    dtype = jnp.dtype(shape.dtype)
    q = jax.random.normal(keys[0], (shape.batch, shape.length, shape.heads, shape.head_dim), dtype)
    kv_shape = (shape.batch, shape.length, shape.kv_heads, shape.head_dim)
    k = jax.random.normal(keys[1], kv_shape, dtype)
    v = jax.random.normal(keys[2], kv_shape, dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)

    def forward_and_backward(attention):  # d_out is an argument, not a baked-in constant
        def run(q, k, v, d_out):
            out, vjp = jax.vjp(attention, q, k, v)
            return vjp(d_out.astype(out.dtype))

        return jax.jit(run)

    as_f32 = lambda x: x.astype(jnp.float32)
    ref = lambda q, k, v: reference.dot_product_attention(q, k, v, is_causal=shape.causal)
    f32_inputs = [as_f32(x) for x in (q, k, v, d_out)]
    want = jax.jit(ref)(*f32_inputs[:3])
    want_grads = forward_and_backward(ref)(*f32_inputs)

    rows = []
    for name in available_implementations():
        attention = lambda q, k, v, name=name: dot_product_attention(
            q, k, v, is_causal=shape.causal, implementation=name
        )
        forward = jax.jit(attention)
        backward = forward_and_backward(attention)
        try:
            out = forward(q, k, v)
            grads = backward(q, k, v, d_out)
        except NotImplementedError as e:
            reason = str(e).splitlines()[-1].strip()  # the dispatcher's line for this one
            rows.append(Row(name, f"declined ({reason})"))
            continue
        max_error = float(jnp.max(jnp.abs(as_f32(out) - want)))
        max_grad_error = max(
            float(jnp.max(jnp.abs(as_f32(g) - w))) for g, w in zip(grads, want_grads, strict=True)
        )
        rows.append(
            Row(
                name,
                "ok",
                max_error,
                max_grad_error,
                median_ms(lambda f=forward: f(q, k, v), repeats),
                median_ms(lambda b=backward: b(q, k, v, d_out), repeats),
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'implementation':<14} {'max |err|':>10} {'grad |err|':>10} {'fwd ms':>9} "
        f"{'fwd+bwd ms':>10}  status"
    )
    lines = [header, "-" * len(header)]
    fmt = lambda x, spec: ("-" if x is None else format(x, spec)).rjust(int(spec.split(".")[0]))
    for r in rows:
        lines.append(
            f"{r.implementation:<14} {fmt(r.max_error, '10.2e')} {fmt(r.max_grad_error, '10.2e')} "
            f"{fmt(r.forward_ms, '9.2f')} {fmt(r.backward_ms, '10.2f')}  {r.status}"
        )
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """Device and versions, recorded with every measurement."""
    import flax
    import jaxlib

    device = jax.devices()[0]
    return dict(
        device=f"{device.platform} ({device.device_kind})",
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        flax=flax.__version__,
        date=datetime.date.today().isoformat(),
    )


def write_json(path: str, shape: AttentionShape, rows: list[Row]) -> None:
    record = dict(
        environment(),
        shape=dataclasses.asdict(shape),
        rows=[dataclasses.asdict(r) for r in rows],
    )
    pathlib.Path(path).write_text(json.dumps(record, indent=2) + "\n")


def attention_demo(shape: AttentionShape, repeats: int) -> list[Row]:
    device = jax.devices()[0]
    print(
        f"dot_product_attention on {device.platform} ({device.device_kind}), jax {jax.__version__}"
    )
    print(
        f"B={shape.batch} T=S={shape.length} N={shape.heads} K={shape.kv_heads} "
        f"H={shape.head_dim} {shape.dtype} causal={shape.causal}; errors vs the float32 reference"
    )
    rows = run_attention_demo(shape, repeats)
    print(format_table(rows))
    failures = [
        r
        for r in rows
        if r.status.startswith("ok") and not np.isfinite([r.max_error, r.max_grad_error]).all()
    ]
    if failures:
        raise SystemExit(f"non-finite results from {[r.implementation for r in failures]}")
    return rows
