"""Issue 17's measurements on the devices of one host: sharded decode, ring attention, Lamina's
overlap and one collective's latency, each against one device, written to one JSON.

On the two-H200 machine (the device tool's `nvidia-h200-x2`), from the repository root:

    python -m benchmarks.multi_gpu --json $OUT/multi_gpu.json

`--small` shrinks every shape for a smoke run on simulated CPU devices (the CPU test runs it;
its times say nothing about GPUs). `--processes N` runs the same parts as one jax.distributed job
of N processes on this host, one GPU each (`--cpu-devices M`: M CPU devices each, for tests);
the leader (process 0) makes the one-device runs and writes the JSON, and the overlap is left
out (its decoder moves arrays between meshes with device_put, which one process cannot do for
another). The one-device and sharded runs of a cell are timed in rounds
(`tuner.time_ms_rounds`: medians over `--repeats` rounds, after warm-up), a run that fails gets
its error in the row; rows are written as they finish.

- collective: a psum of a bf16 scalar and of a [B, N, H] bf16 array over all devices inside
  `jax.shard_map`, one dispatch each, and CHAIN psums in one program (the latency of the
  collective itself, without the host's dispatch: the floor of one sharded decode step).
- decode: `jattn.decode_attention` on one device against `offload.sharded_decode_attention`
  by heads and by sequence (contiguous and striped token order) over all devices, bf16,
  B = 8, N = 32, K = 8, H = 128, lengths spread from S/3 to S; the cache, q and the lengths
  placed on the mesh once (as a `KVCache` step has them). Timed per call (one dispatch each)
  and in a step (CHAIN attentions in one program, each query the last output: a decode step's
  layers). Bandwidth: KV bytes of the valid tokens read per second.
- ring: `jattn.dot_product_attention` on one device against `jattn.parallel.ring_attention`
  over all devices, causal, bf16, B = 1, N = K = 16, H = 128; the natural (contiguous) layout
  and the caller's zig-zag order (`layout='zigzag'`); forward and forward + backward;
  TFLOP/s by the FlashAttention convention (causal: half of 4 B N T^2 H forward, 2.5x that
  for forward + backward).
- overlap: `jattn.offload.demo.overlap_benchmark` (tokens/s of the offloaded decoder with and
  without Lamina's micro-batches at a batch that fills the attention device, co-located on
  one device at the batch that fits there beside the weights, and data parallel over all
  devices with that batch on each), OVERLAP_MODEL at a context of
  max_len - 26 (`start_at`), the median of OVERLAP_ROUNDS timings of 8 steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jattn
from jattn import offload, parallel
from jattn.autotune import tuner
from jattn.demo import environment
from jattn.offload import demo as offload_demo
from jattn.offload.sharded import cache_spec, check_shardable

DECODE = dict(batch=8, heads=32, kv_heads=8, head_dim=128)
RING = dict(batch=1, heads=16, kv_heads=16, head_dim=128)
SMALL_DECODE = dict(batch=4, heads=16, kv_heads=8, head_dim=16)  # K: heads over 8 devices
SMALL_RING = dict(batch=1, heads=2, kv_heads=2, head_dim=16)
PARTS = ("collective", "decode", "ring", "overlap")
# Lamina's overlap pays where the compute side is busy as long as the attention side, and does
# not pay twice for its weights when the batch is cut in two: micro-batches of ~230 sequences
# keep the d = 16384 matmuls compute-bound (at 116, as with 4096-slot caches, each micro-batch
# re-read the weights: 1.19x); offloading pays where the weights take a large share of one
# device. So: N = 128, K = 16, H = 128, 9 layers (49.7 GB of bf16 weights), 2048-slot caches
# (151 MB per sequence): ~460 sequences fill an H200's 112 GB, ~236 co-located.
OVERLAP_MODEL = dict(layers=9, heads=128, kv_heads=16, head_dim=128, max_len=2048, dtype="bfloat16")
OVERLAP_ROUNDS = 3  # timings of the overlap's steps; their median is reported
MULTIPROCESS_CALLS = 10  # calls per timing under several processes (the same in every one)
CHAIN = 8  # collectives or decode attentions chained in one program (a step's layers)


def _jit(fn: Callable, mode: str) -> Callable:
    """The forward, or (mode 'fwd+bwd') dq, dk, dv of the sum of fn's output, jitted."""
    if mode == "fwd":
        return jax.jit(fn)
    return jax.jit(
        jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    )


def _rounds(calls: dict, repeats: int) -> dict:
    """`tuner.time_ms_rounds`; on simulated CPU devices each call waits for its result (many
    collective programs dispatched back to back stalled XLA:CPU's rendezvous on 2 cores).

    Under several processes every process must issue the same collective programs the same
    number of times: a fixed number of calls per timing (no per-process calibration), and the
    one-device calls, which only the leader makes, hold no collective."""
    if jax.devices()[0].platform == "cpu":
        calls = {
            name: functools.partial(lambda f: jax.block_until_ready(f()), f)
            for name, f in calls.items()
        }
    if jax.process_count() == 1:
        return tuner.time_ms_rounds(calls, repeats)
    times = {name: [] for name in calls}
    for fn in calls.values():  # warm-up (compiles)
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(MULTIPROCESS_CALLS):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) * 1e3 / MULTIPROCESS_CALLS)
    return {name: statistics.median(samples) for name, samples in times.items()}


def _leader() -> bool:
    """The process that makes the one-device runs (on `jax.devices()[0]`) and writes results."""
    return jax.process_index() == 0


def _random(key, shape, sharding, transform=None) -> jax.Array:
    """Normal bf16 values made in their shards by one jitted program (also when the mesh spans
    processes: an array on one local device cannot be `device_put` across them)."""

    def make():
        x = jax.random.normal(key, shape, jnp.bfloat16)
        return x if transform is None else transform(x)

    return jax.jit(make, out_shardings=sharding)()


def _filled(shape, sharding) -> jax.Array:
    return jax.jit(lambda: jnp.ones(shape, jnp.bfloat16), out_shardings=sharding)()


def _ms(ms: float | str) -> dict:
    """A row's time, or the error of a run that failed (`tuner.time_ms_rounds`)."""
    return dict(ms=ms) if isinstance(ms, float) else dict(error=ms)


def _ratio(base: float | str, ms: float) -> float | None:
    return base / ms if isinstance(base, float) else None


def collective(devices, *, batch: int, heads: int, head_dim: int, repeats: int) -> list[dict]:
    """One psum's latency over the mesh: a scalar and a decode step's output."""
    mesh = offload.make_mesh(devices)
    calls, sizes = {}, {}
    for name, shape in (
        ("scalar", (len(devices),)),
        ("decode_out", (len(devices), batch * heads, head_dim)),
    ):
        x = _filled(shape, NamedSharding(mesh, P("attn")))
        psum = jax.shard_map(
            lambda x: jax.lax.psum(x, "attn"), mesh=mesh, in_specs=P("attn"), out_specs=P("attn")
        )
        calls[name] = functools.partial(jax.jit(psum), x)
        sizes[name] = int(np.prod(shape[1:], dtype=np.int64)) * 2
    rows = []
    for name, ms in _rounds(calls, repeats).items():
        rows.append(dict(part="collective", what=f"psum {name}", bytes=sizes[name], **_ms(ms)))
    # In one program: CHAIN psums, each waiting for the last (no host dispatch between them).
    x = _filled((len(devices),), NamedSharding(mesh, P("attn")))
    chained = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.fori_loop(0, CHAIN, lambda _, y: jax.lax.psum(y, "attn") * 0.5, x),
            mesh=mesh,
            in_specs=P("attn"),
            out_specs=P("attn"),
            check_vma=False,  # the carry: varying in, replicated out
        )
    )
    ms = _rounds({"chain": functools.partial(chained, x)}, repeats)["chain"]
    ms = ms / CHAIN if isinstance(ms, float) else ms
    rows.append(dict(part="collective", what=f"psum scalar, {CHAIN} in one program", **_ms(ms)))
    return rows


def decode(devices, lengths: list[int], shape: dict, *, repeats: int) -> list[dict]:
    """One device against sharding by heads and by sequence, per cache length S."""
    mesh = offload.make_mesh(devices)
    b, n, k, h = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    rows = []
    for s in lengths:
        rng = np.random.default_rng(s)
        keys = jax.random.split(jax.random.key(s), 3)  # q, k cache, v cache
        shapes = ((b, n, h), (b, s, k, h), (b, s, k, h))
        kv_len = rng.integers(s // 3, s + 1, b).astype(np.int32)
        kv_bytes = 2 * int(kv_len.sum()) * k * h * 2  # K and V of the valid tokens, bf16
        calls = {}
        if _leader():
            one = jax.sharding.SingleDeviceSharding(devices[0])
            q, kc, vc = (_random(x, shape, one) for x, shape in zip(keys, shapes, strict=True))
            lens = jax.device_put(kv_len, one)
            for timing, make in (("call", jax.jit), ("in a step", _chained)):
                calls[(1, None, timing)] = functools.partial(
                    make(jattn.decode_attention), q, kc, vc, lens
                )
        for shard_by, order in (
            ("heads", "contiguous"), ("sequence", "contiguous"), ("sequence", "striped")
        ):  # fmt: skip
            label = shard_by if order == "contiguous" else f"{shard_by} {order}"
            try:
                check_shardable(shapes[1], mesh, "attn", shard_by)
            except ValueError as error:
                rows.append(dict(part="decode", S=s, shard_by=label, error=str(error)[:200]))
                continue
            # Everything where a KVCache step has it: the cache cut over the mesh (striped as a
            # KVCache keeps it by sequence), q (and so the output) cut by heads or replicated,
            # the lengths replicated.
            stripe = None if order == "contiguous" else functools.partial(
                offload.striped, n=len(devices)
            )  # fmt: skip
            placed = NamedSharding(mesh, cache_spec(shard_by, "attn"))
            kc, vc = (_random(x, shapes[1], placed, stripe) for x in keys[1:])
            q_spec = P(None, "attn", None) if shard_by == "heads" else P()
            placed_q = _random(keys[0], shapes[0], NamedSharding(mesh, q_spec))
            placed_lens = jax.device_put(kv_len, NamedSharding(mesh, P()))  # the same everywhere
            sharded = functools.partial(
                offload.sharded_decode_attention, mesh=mesh, shard_by=shard_by, token_order=order
            )
            for timing, make in (("call", jax.jit), ("in a step", _chained)):
                calls[(len(devices), label, timing)] = functools.partial(
                    make(sharded), placed_q, kc, vc, placed_lens
                )
        times = _rounds(calls, repeats)
        for (count, shard_by, timing), ms in times.items():
            ms = ms / CHAIN if isinstance(ms, float) and timing != "call" else ms
            row = dict(
                part="decode", S=s, devices=count, shard_by=shard_by, timing=timing, **_ms(ms)
            )
            one = times.get((1, None, timing), "the leader's")
            if isinstance(ms, float):
                one = one / CHAIN if isinstance(one, float) and timing != "call" else one
                row.update(tbps=kv_bytes / ms / 1e9, speedup=_ratio(one, ms))
            rows.append(row)
    return rows


def _chained(attend: Callable) -> Callable:
    """CHAIN decode attentions in one jitted program, each query the last one's output (a
    decode step's layers, without a host dispatch per layer); time / CHAIN is one layer's."""

    def run(q, k_cache, v_cache, lengths):
        step = lambda _, q: attend(q, k_cache, v_cache, lengths).astype(q.dtype)  # noqa: E731
        return jax.lax.fori_loop(0, CHAIN, step, q)

    return jax.jit(run)


def ring(devices, lengths: list[int], shape: dict, *, repeats: int) -> list[dict]:
    """Causal attention over T tokens: one device against the ring over all devices."""
    mesh = jax.make_mesh((len(devices),), ("seq",), devices=devices)
    b, n, k, h = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    rows = []
    for t in lengths:
        keys = jax.random.split(jax.random.key(t), 3)  # q, k, v
        shapes = ((b, t, n, h), (b, t, k, h), (b, t, k, h))
        flops = 4 * b * n * t * t * h / 2  # causal: half the matrix
        seq = NamedSharding(mesh, P(None, "seq"))
        count = len(devices)
        # The caller keeps its tokens in ring order (permuted once, when loading data).
        zigzag = functools.partial(parallel.ring_order, n=count)
        placed = {
            layout: [_random(x, shape, seq, order) for x, shape in zip(keys, shapes, strict=True)]
            for layout, order in (("contiguous", None), ("zigzag", zigzag))
        }
        local = []
        if _leader():
            one_device = jax.sharding.SingleDeviceSharding(devices[0])
            local = [_random(x, shape, one_device) for x, shape in zip(keys, shapes, strict=True)]

        def one(q, k, v):
            return jattn.dot_product_attention(q, k, v, is_causal=True)

        def over_ring(q, k, v, layout):
            return parallel.ring_attention(
                q, k, v, mesh=mesh, axis="seq", is_causal=True, layout=layout
            )

        for mode in ("fwd", "fwd+bwd"):
            calls = {(1, None): functools.partial(_jit(one, mode), *local)} if local else {}
            for layout, arrays in placed.items():
                fn = functools.partial(over_ring, layout=layout)
                calls[(count, layout)] = functools.partial(_jit(fn, mode), *arrays)
            times = _rounds(calls, repeats)
            work = flops * (1.0 if mode == "fwd" else 2.5)
            for (devices_used, layout), ms in times.items():
                row = dict(
                    part="ring", T=t, mode=mode, devices=devices_used, layout=layout, **_ms(ms)
                )
                if isinstance(ms, float):
                    one_ms = times.get((1, None), "the leader's")
                    row.update(tflops=work / ms / 1e9, speedup=_ratio(one_ms, ms))
                rows.append(row)
    return rows


def overlap(
    devices, config, *, batch: int | None, context: int, steps: int, rounds: int
) -> list[dict]:
    """Lamina's micro-batched decoder against the plain offloaded one and one device, at a
    batch that fills the attention devices (batch=None) and a long context."""
    row = dict(
        part="overlap",
        **offload_demo.overlap_benchmark(
            devices, config, batch=batch, context=context, steps=steps, rounds=rounds
        ),
    )
    errors = [v for k, v in row.items() if k.startswith("tokens_per_s") and isinstance(v, str)]
    if errors:
        row["error"] = "; ".join(errors)
    return [row]


def plot(record: dict, path: str) -> None:
    """Speed-up over one device: sharded decode against S (in a step), ring attention against T
    (forward and forward + backward, each layout), and the overlap's tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    n = record["devices"]
    ax = axes[0]
    decode = [r for r in rows if r["part"] == "decode" and r["timing"] == "in a step"]
    for label in sorted({r["shard_by"] for r in decode if r["shard_by"]}):
        points = sorted((r["S"], r["speedup"]) for r in decode if r["shard_by"] == label)
        ax.plot(*zip(*points, strict=True), "o-", label=f"by {label}")
    ax.set(xscale="log", xlabel="cache length S", ylabel=f"speed-up over 1 device ({n} devices)",
           title="sharded decode attention (per layer, in a step)")  # fmt: skip
    ax = axes[1]
    ring = [r for r in rows if r["part"] == "ring" and r["devices"] > 1]
    for layout, mode in sorted({(r["layout"], r["mode"]) for r in ring}):
        points = sorted((r["T"], r["speedup"]) for r in ring if (r["layout"], r["mode"]) == (
            layout, mode))  # fmt: skip
        ax.plot(*zip(*points, strict=True), "o-", label=f"{layout}, {mode}")
    ax.set(xscale="log", xlabel="tokens T", title="causal ring attention")
    for ax in axes[:2]:
        ax.axhline(n, color="grey", lw=0.8, ls=":")
        ax.axhline(1, color="grey", lw=0.8)
        ax.legend(fontsize=8)
    ax = axes[2]
    for r in (r for r in rows if r["part"] == "overlap"):
        names = ["co-located\n(1 device)", "offloaded", "offloaded\n+ overlap"]
        values = [r[f"tokens_per_s_{k}"] for k in ("colocated", "plain", "overlapped")]
        batches = [r["colocated_batch"], r["batch"], r["batch"]]
        if "tokens_per_s_data_parallel" in r:  # rows since stop 30's results
            names.append(f"data parallel\n({n} devices)")
            values.append(r["tokens_per_s_data_parallel"])
            batches.append(r["data_parallel_batch"])
        bars = ax.bar(names, [v if isinstance(v, float) else 0 for v in values])
        for bar, batch in zip(bars, batches, strict=True):
            ax.annotate(f"B = {batch}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set(ylabel="decode tokens / s", title=f"Lamina's overlap (context {r['context']})")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{record['environment'].get('device', '')} x {n}, jax "
                 f"{record['environment'].get('jax', '')}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--ring-lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument(
        "--batch", type=int, default=None, help="overlap's batch (default: fill the memory)"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="CPU smoke sizes")
    parser.add_argument("--plot", help="write a PNG of the speed-ups here")
    parser.add_argument(
        "--replot", action="store_true", help="only draw --plot from an existing --json"
    )
    parser.add_argument(
        "--processes", type=int, default=1,
        help="launch this many processes under jax.distributed, one GPU each (the same runs, "
        "multi-controller)",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-devices", type=int, default=None,
        help="with --processes: CPU devices per process instead of one GPU (smoke runs)",
    )  # fmt: skip
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.json) as f:
            plot(json.load(f), args.plot)
        return
    if args.processes > 1 and args.process_id is None:
        launch(sys.argv[1:] if argv is None else list(argv), args.processes, args.cpu_devices)
        return
    if args.process_id is not None:
        _initialize(args)
    devices = jax.devices()
    if len(devices) < 2:
        raise SystemExit(f"needs 2 or more devices, found {len(devices)}")
    decode_shape, ring_shape = (SMALL_DECODE, SMALL_RING) if args.small else (DECODE, RING)
    config, batch = offload.GPTConfig(**OVERLAP_MODEL), args.batch
    if args.small:
        config = offload.GPTConfig(layers=1, heads=8, kv_heads=4, head_dim=8, max_len=32)
        batch = batch or 4
    steps = 4 if args.small else 8
    context = config.max_len - OVERLAP_ROUNDS * steps - 2  # the first and warm-up steps
    record = dict(environment=environment(), devices=len(devices), rows=[])

    record["processes"] = jax.process_count()

    def save(rows):
        if not _leader():
            return
        record["rows"].extend(rows)
        for row in rows:
            print(row, flush=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)

    out_shape = {name: decode_shape[name] for name in ("batch", "heads", "head_dim")}
    parts = {
        "collective": lambda: collective(devices, **out_shape, repeats=args.repeats),
        "decode": lambda: decode(devices, args.decode_lengths, decode_shape, repeats=args.repeats),
        "ring": lambda: ring(devices, args.ring_lengths, ring_shape, repeats=args.repeats),
        "overlap": lambda: overlap(
            devices, config, batch=batch, context=context, steps=steps, rounds=OVERLAP_ROUNDS
        ),
    }
    for name in args.parts:
        if name == "overlap" and jax.process_count() > 1:
            save([dict(part=name, error="not run under several processes (OffloadedDecoder "
                                    "moves arrays between meshes with device_put)")])  # fmt: skip
            continue
        save(parts[name]())
    if args.plot and _leader():
        plot(record, args.plot)
    if args.process_id is not None:
        jax.distributed.shutdown()


def launch(argv: list[str], processes: int, cpu_devices: int | None) -> None:
    """Run this benchmark as `processes` processes of one jax.distributed job on this host (one
    GPU each, or `cpu_devices` CPU devices each); the leader writes the JSON. SystemExit when
    one fails, with its output's tail."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # a forced host device count would clash with --cpu-devices
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "benchmarks.multi_gpu", *argv]
    procs = [
        subprocess.Popen(
            [*command, "--process-id", str(i), "--coordinator", f"localhost:{port}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [p.communicate()[0] for p in procs]
    print(outputs[0], end="")
    failed = [(i, out[-3000:]) for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
              if p.returncode]  # fmt: skip
    if failed:
        raise SystemExit("\n".join(f"process {i} failed:\n{out}" for i, out in failed))


def _initialize(args) -> None:
    """This process's part of the jax.distributed job `launch` started (before any device is
    touched): one GPU, or `--cpu-devices` CPU devices talking over gloo."""
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.processes,
        process_id=args.process_id,
        initialization_timeout=60,
        local_device_ids=None if args.cpu_devices else [args.process_id],
    )


if __name__ == "__main__":
    main()
