"""`jattn demo`: what jattn does, run on this machine in a few seconds.

Part `attention`: every available implementation of `dot_product_attention` on one shape,
checked against the reference (forward and gradients) and timed.

Part `gpt`: end to end. Trains the small GPT of `jattn.examples.gpt` (jattn attention: the
Pallas kernels on a GPU) for a few hundred steps on the Python standard library's own sources,
then generates with the KV cache: prefill through `dot_product_attention`, decode steps through
`jattn.offload.sharded_decode_attention` with the cache sharded over the attention devices
(simulated CPU devices on a machine without accelerators). Prints loss curve points, tokens/s
and a sample. Everything it runs ships with the package (no repository checkout needed).

Part `decode`: attention offloading (`jattn/offload/demo.py`) on `--devices` simulated CPU
devices: sharded vs single-device errors, KV capacity per device count, and generation with
weights on compute devices and the KV cache + attention on attention devices.
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
from jattn.demo_config import DEMO_PARTS as DEMO_PARTS
from jattn.demo_config import AttentionShape as AttentionShape
from jattn.demo_config import GPTDemo as GPTDemo

PALLAS_KERNELS = ("triton", "mosaic")  # timed only on a GPU: elsewhere they run interpreted


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
        if name in PALLAS_KERNELS and jax.default_backend() != "gpu":
            rows.append(Row(name, "skipped: a GPU kernel (interpret mode only here; tests run it)"))
            continue
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


def use_cpu_devices(count: int) -> bool:
    """Ask for `count` simulated CPU devices; only possible before JAX starts its backends."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
        return True
    except (RuntimeError, AttributeError):  # backends already up: use what there is
        return False


def gpt_demo(settings: GPTDemo, progress: bool = True) -> dict:
    """Train the small GPT, then sample with attention offloaded to the attention devices."""
    import functools

    from flax import nnx
    from jax.sharding import NamedSharding

    from jattn import offload
    from jattn.examples import gpt, text, train

    start = time.perf_counter()
    corpus = text.load_corpus(max_bytes=settings.corpus_bytes)
    device = jax.devices()[0]
    megabytes = (len(corpus.train) + len(corpus.valid)) / 1e6
    print(
        f"\nGPT end to end on {device.platform} ({device.device_kind}): {settings.layers} layers, "
        f"dim {settings.dim}, {settings.heads} heads ({settings.kv_heads} kv), "
        f"{settings.steps} steps of {settings.batch_size}x{settings.seq_len} byte tokens from "
        f"{corpus.num_files} Python stdlib files ({megabytes:.1f} MB)"
    )
    config = gpt.GPTConfig(
        vocab_size=text.VOCAB_SIZE,
        max_length=max(settings.seq_len, len(settings.prompt.encode()) + settings.sample_tokens),
        num_layers=settings.layers,
        dim=settings.dim,
        num_heads=settings.heads,
        num_kv_heads=settings.kv_heads,
    )
    model = gpt.GPT(config, rngs=nnx.Rngs(settings.seed))
    log_every = max(1, settings.steps // 12)
    history = train.train_language_model(
        model,
        corpus,
        train.LMTraining(
            steps=settings.steps,
            batch_size=settings.batch_size,
            seq_len=settings.seq_len,
            warmup_steps=max(1, settings.steps // 10),
            log_every=log_every,
            eval_every=4 * log_every,
            seed=settings.seed,
        ),
        progress=progress,
    )
    train_seconds = time.perf_counter() - start
    losses = [line for line in history if "loss" in line]
    print(f"{'step':>6} {'loss':>7} {'val loss':>9} {'tokens/s':>10}")
    val = {line["step"]: line["val_loss"] for line in history if "val_loss" in line}
    for line in losses:
        val_text = f"{val[line['step']]:9.3f}" if line["step"] in val else " " * 9
        print(f"{line['step']:>6} {line['loss']:7.3f} {val_text} {line['tokens_per_s']:10,.0f}")
    train_rate = float(np.median([line["tokens_per_s"] for line in losses[1:] or losses]))

    devices = jax.devices()[: settings.attention_devices]
    shard_by = "heads" if settings.kv_heads % len(devices) == 0 else "sequence"
    mesh = offload.make_mesh(devices, "attn")
    model.set_decode_fn(
        functools.partial(
            offload.sharded_decode_attention, mesh=mesh, axis="attn", shard_by=shard_by
        )
    )
    prompt = jnp.asarray(text.encode(settings.prompt)[None])
    needed = prompt.shape[1] + settings.sample_tokens
    capacity = -(-needed // len(devices)) * len(devices)  # sequence sharding: S % devices == 0
    generate = functools.partial(
        gpt.generate,
        model,
        prompt,
        seed=settings.seed,
        cache_length=capacity,
        cache_sharding=NamedSharding(mesh, offload.cache_spec(shard_by, "attn")),
    )
    jax.block_until_ready(generate(2))  # compiles the prefill and the decode step
    begin = time.perf_counter()
    tokens = np.asarray(generate(settings.sample_tokens))
    decode_seconds = time.perf_counter() - begin
    sample = settings.prompt + text.decode(tokens[0])
    decode_rate = settings.sample_tokens / decode_seconds
    print(
        f"training: {train_rate:,.0f} tokens/s (median); {train_seconds:.0f} s with data and "
        f"compilation"
    )
    print(
        f"generation: {decode_rate:,.1f} tokens/s, KV cache and decode attention sharded by "
        f"{shard_by} over {len(devices)} {devices[0].platform} devices "
        f"(jattn.offload.sharded_decode_attention)"
    )
    print(f"sample ({settings.sample_tokens} tokens after {settings.prompt!r}):")
    print(sample)
    return dict(
        losses=[(line["step"], line["loss"]) for line in losses],
        val_losses=sorted(val.items()),
        train_tokens_per_s=train_rate,
        decode_tokens_per_s=decode_rate,
        attention_devices=len(devices),
        shard_by=shard_by,
        sample=sample,
    )
