"""`jattn demo decode`: attention offloading on N (simulated) devices, in well under a minute.

1. Correctness: sharded decode attention vs one device, by heads and by sequence, for 1..N
   attention devices, with ragged lengths (an empty sequence, shards with no keys).
2. Capacity: KV bytes per token and the context that fits per number of attention devices.
3. Generation: a small random-weight GPT whose weights and MLP stay on the compute devices while
   the KV cache and attention live on the attention devices; tokens/s, bytes crossing per token
   and layer (counted vs the formula), head vs sequence sharding, and the logits checked against a
   whole-sequence forward on one device.

CPU devices are simulated with `jax_num_cpu_devices` (the CLI sets it from `--devices` before JAX
starts its backends); on CPU the times say nothing about GPUs, the bytes and errors do.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jattn
from jattn.offload.model import (
    DataParallelDecoder,
    GPTConfig,
    OffloadedDecoder,
    OverlappedDecoder,
    forward,
    init_params,
    link_bytes_formula,
    split_devices,
)
from jattn.offload.sharded import KVCache, make_mesh, sharded_decode_attention

# Llama-3-70B's cache shape, for the capacity table: 80 layers, 8 kv heads of 128, bf16.
LLAMA3_70B = dict(layers=80, kv_heads=8, head_dim=128, itemsize=2)
# Per device, for the capacity table, where the device does not say (CPU): an H100's HBM.
DEVICE_MEMORY_GB = 80
# Unit roundoff (2^-significand bits) of what a matmul multiplies, by input format.
_ROUNDOFF = {"float32": 2.0**-24, "tensorfloat32": 2.0**-11, "float16": 2.0**-11,
             "bfloat16": 2.0**-8, "bfloat16_3x": 2.0**-16}  # fmt: skip
# float32 matmuls by platform and jax_default_matmul_precision: GPUs multiply in TF32 by default,
# TPUs in one bfloat16 pass; 'high' is three bfloat16 passes; CPUs stay float32 whatever is set.
_DEFAULT_F32_FORMAT = {"gpu": "tensorfloat32", "tpu": "bfloat16"}
_PRECISION_FORMAT = {
    "high": "bfloat16_3x",
    "bfloat16_3x": "bfloat16_3x",
    "tensorfloat32": "tensorfloat32",
    "bfloat16": "bfloat16",
    "highest": "float32",
    "float32": "float32",
}
# The decode demo's logits come from 2 layers of d = 256 sums: an error of a few roundoffs of
# the matmul inputs per layer (TF32 on an H200 gave 1.2e-3 = 2.5 roundoffs); 8 leaves room.
ROUNDOFFS_ALLOWED = 8
TOLERANCE_FLOOR = 1e-4  # float32 on CPU: what the demo has always met


def matmul_roundoff(platform: str, dtype="float32", precision: str | None = None) -> float:
    """Unit roundoff of the numbers a matmul of `dtype` multiplies on `platform` ('cpu', 'gpu'
    or 'cuda'/'rocm', 'tpu') under `jax_default_matmul_precision` = `precision`."""
    dtype = str(jnp.dtype(dtype))
    platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
    if dtype != "float32" or platform == "cpu":
        return _ROUNDOFF.get(dtype, _ROUNDOFF["float32"])
    default = _DEFAULT_F32_FORMAT.get(platform, "float32")
    if precision in (None, "default", "fastest"):
        return _ROUNDOFF[default]
    return _ROUNDOFF[_PRECISION_FORMAT.get(str(precision), "float32")]


def logit_tolerance(platform: str, dtype="float32", precision: str | None = None) -> float:
    """How far the offloaded decoder's logits may be from the whole-sequence reference (run in
    the same process, at the same matmul precision): both round their matmul inputs, in a
    different order, so the tolerance follows the platform's matmul precision."""
    return max(TOLERANCE_FLOOR, ROUNDOFFS_ALLOWED * matmul_roundoff(platform, dtype, precision))


def device_memory_bytes(device) -> tuple[int, str]:
    """(bytes, where from): the memory JAX may use on `device` (`memory_stats()['bytes_limit']`,
    the allocator's limit: on a GPU a share of its HBM), else DEVICE_MEMORY_GB (an H100)."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # platforms without memory stats (CPU) may raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "bytes_limit"
    return DEVICE_MEMORY_GB * 10**9, f"assumed {DEVICE_MEMORY_GB} GB (an H100)"


# The share of a device's memory `batch_that_fits` leaves free (activations, kernel workspace).
HEADROOM = 0.1
SPARE_LAYERS = 4  # layers of cache `batch_that_fits` leaves free besides HEADROOM
# The cache capacity is a multiple of this, so sequence sharding divides it over 1..64 devices.
CACHE_ROUNDING = 64


def set_device_count(n: int) -> str | None:
    """Ask JAX for n CPU devices; must run before JAX starts its backends.

    Returns None on success, or why it could not (backends already running, e.g. inside a test
    process): the demo then uses the devices that exist.
    """
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        return "JAX's backends were already initialised; using the devices that exist"
    return None


def demo_devices(n: int) -> list:
    """n devices: the default backend's if it has that many, else simulated CPU devices."""
    devices = jax.devices()
    if len(devices) < n:
        devices = jax.devices("cpu")
    return devices[:n]


def correctness(devices: list, rng: np.random.Generator) -> list[dict]:
    batch, heads, kv_heads, dim, capacity = 4, 32, 8, 64, 512
    q = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, dim)), jnp.float32)
    lengths = np.array([0, 37, 300, capacity])  # empty; most devices hold no key of seq 1
    want = jattn.decode_attention(q, k, v, lengths)
    rows = []
    n = 1
    while n <= len(devices):
        mesh = make_mesh(devices[:n])
        for shard_by in ("heads", "sequence"):
            got = sharded_decode_attention(q, k, v, lengths, mesh=mesh, shard_by=shard_by)
            err = float(jnp.max(jnp.abs(got - want)))
            rows.append(dict(devices=n, shard_by=shard_by, max_error=err))
        n *= 2
    return rows


def capacity(devices: list, config: GPTConfig, batch: int) -> list[dict]:
    rows = []
    e = jnp.dtype(config.dtype).itemsize
    per_token = 2 * config.layers * config.kv_heads * config.head_dim * e
    llama = LLAMA3_70B
    llama_token = 2 * llama["layers"] * llama["kv_heads"] * llama["head_dim"] * llama["itemsize"]
    memory, source = device_memory_bytes(devices[0])
    n = 1
    while n <= len(devices):
        cache = KVCache.create(
            make_mesh(devices[:n]),
            num_layers=config.layers,
            batch=batch,
            capacity=config.max_len,
            kv_heads=config.kv_heads,
            head_dim=config.head_dim,
            dtype=jnp.dtype(config.dtype),
            shard_by="sequence",
        )
        rows.append(
            dict(
                devices=n,
                demo_cache_bytes_per_device=cache.nbytes_per_device,
                demo_kv_bytes_per_token=per_token,
                llama3_70b_kv_bytes_per_token=llama_token,
                llama3_70b_tokens_that_fit=n * memory // llama_token,
                device_memory_bytes=memory,
                device_memory_source=source,
            )
        )
        del cache
        n *= 2
    return rows


def generation(
    devices: list, config: GPTConfig, batch: int, prompt_len: int, steps: int, progress: bool
) -> list[dict]:
    params = init_params(config, jax.random.key(0))
    prompt = np.random.default_rng(0).integers(0, config.vocab, (batch, prompt_len))
    half = max(1, len(devices) // 2)
    compute = devices[:half] if len(devices) > 1 else devices
    attention = devices[half:] if len(devices) > 1 else devices
    rows = []
    for shard_by in ("heads", "sequence"):
        attn = attention
        note = ""
        if shard_by == "heads" and config.kv_heads % len(attn):
            # Head sharding cannot use more devices than kv heads (Lamina's limit).
            usable = max(d for d in range(1, len(attn) + 1) if config.kv_heads % d == 0)
            note = f"K={config.kv_heads} kv heads: {usable} of {len(attn)} attention devices"
            attn = attn[:usable]
        decoder = OffloadedDecoder(
            params,
            config,
            compute_devices=compute,
            attention_devices=attn,
            batch=batch,
            shard_by=shard_by,
        )
        decoder.step(prompt[:, 0])  # compile everything once, outside the timing
        jax.block_until_ready(decoder.cache.keys[0])
        decoder = OffloadedDecoder(
            params,
            config,
            compute_devices=compute,
            attention_devices=attn,
            batch=batch,
            shard_by=shard_by,
        )
        total = prompt_len + steps
        with tqdm(total=total, desc=f"decode ({shard_by})", disable=not progress) as bar:
            start = time.perf_counter()
            tokens = decoder.generate(prompt, steps, progress=bar.update)
            jax.block_until_ready(decoder.last_logits)
            seconds = time.perf_counter() - start
        want = forward(params, jnp.asarray(tokens), config)[:, -1]
        d, e = config.width, jnp.dtype(config.dtype).itemsize
        kv_read = 2 * config.kv_heads * config.head_dim * e * (total / 2)  # mean context
        rows.append(
            dict(
                shard_by=shard_by,
                compute_devices=len(compute),
                attention_devices=len(attn),
                tokens_per_s=batch * total / seconds,
                link_bytes_measured=decoder.link_bytes_per_token_layer(),
                link_bytes_formula=link_bytes_formula(config, shard_by, len(attn)),
                lamina_formula=(2 + 2 * config.kv_heads / config.heads) * e * d,
                link_to_hbm_ratio=decoder.link_bytes_per_token_layer() / kv_read,
                max_logit_error=float(jnp.max(jnp.abs(want - decoder.last_logits))),
                sample=bytes(int(t) % 256 for t in tokens[0, prompt_len:]).hex()[:32],
                note=note,
            )
        )
    return rows


def params_bytes(params) -> int:
    """Bytes of a parameter pytree."""
    return sum(x.nbytes for x in jax.tree.leaves(params))


def batch_that_fits(
    config: GPTConfig,
    memory: int,
    *,
    weights_bytes: int = 0,
    attention_devices: int = 1,
    multiple: int = 1,
    headroom: float = HEADROOM,
) -> int:
    """The most sequences whose KV cache (`max_len` slots each, all layers, cut over
    `attention_devices`) fits beside `weights_bytes` in `memory` bytes per device, keeping
    `headroom` of it free for activations and workspace, and room for SPARE_LAYERS more layers
    of cache (on an H200, 9 layers with 8% headroom ran out of memory compiling the append,
    and 2 spare layers still ran out of memory by 3 layers' worth in the first step); rounded
    down to a `multiple`, 0 when not even that many fit."""
    e = jnp.dtype(config.dtype).itemsize
    layers = config.layers + SPARE_LAYERS
    per_sequence = 2 * layers * config.kv_heads * config.head_dim * e * config.max_len
    room = memory * (1 - headroom) - weights_bytes
    fits = int(max(room, 0) * attention_devices // per_sequence)
    return fits // multiple * multiple


def overlap_benchmark(
    devices: list,
    config: GPTConfig,
    *,
    batch: int | None = None,
    colocated_batch: int | None = None,
    context: int | None = None,
    micro_batches: int = 2,
    prompt_len: int = 8,
    steps: int = 16,
    rounds: int = 3,
    shard_by: str = "heads",
    num_attention: int | None = None,
    seed: int = 0,
) -> dict:
    """Decode tokens/s of `OffloadedDecoder` and `OverlappedDecoder` (Lamina's micro-batches) on
    the same compute/attention split of `devices`, of the co-located decoder on `devices[0]`
    alone (weights and cache on one device), and of `DataParallelDecoder` over all `devices`
    (the co-located batch on each), after a warm-up step: the median of `rounds` timings of
    `steps` steps each; for issue 17's GPU runs.

    batch: the offloaded decoders' batch; None: the most that fits the attention devices
      (`batch_that_fits`, what offloading is for). colocated_batch: the co-located decoder's;
      None: the most that fits one device beside the weights (capped at `batch`).
    context: start every sequence at this position (`start_at`: the context slots hold zeros,
      the decode step costs what it costs after a real prompt); None: a prefill of a random
      `prompt_len`-token prompt.
    A decoder that cannot run (out of memory) gets its error string instead of tokens/s.
    """
    params = init_params(config, jax.random.key(seed))
    compute, attention = split_devices(devices, num_attention)
    weights = params_bytes(params)
    memory, source = device_memory_bytes(devices[0])
    if batch is None:
        batch = batch_that_fits(
            config, memory, attention_devices=len(attention), multiple=micro_batches
        )
    if colocated_batch is None:
        colocated_batch = min(batch, batch_that_fits(config, memory, weights_bytes=weights))
    start = prompt_len if context is None else context
    positions = start + (1 if context is None else 2) + rounds * steps  # warm-up steps too
    if positions > config.max_len:
        raise ValueError(
            f"the context ({start}), its first and warm-up steps and rounds x steps = "
            f"{rounds} x {steps} need {positions} positions: more than max_len = "
            f"{config.max_len}"
        )

    def tokens_per_s(make, size: int) -> float | str:
        decoder = None
        try:
            decoder = make(size)
            if context is None:
                prompt = np.random.default_rng(seed).integers(0, config.vocab, (size, prompt_len))
                logits = decoder.prefill(prompt)
            else:
                decoder.start_at(context)
                logits = decoder.step(np.zeros(size, np.int32))
            nxt = np.asarray(jnp.argmax(logits, -1), np.int32)
            jax.block_until_ready(decoder.step(nxt))  # compiles every step function
            seconds = []
            for _ in range(rounds):
                begin = time.perf_counter()
                for _ in range(steps):
                    logits = decoder.step(nxt)
                jax.block_until_ready(logits)
                seconds.append(time.perf_counter() - begin)
            return size * steps / statistics.median(seconds)
        except Exception as error:  # out of memory on one device: report, do not stop
            return f"{type(error).__name__}: {str(error)[:200]}"
        finally:
            del decoder  # free its cache before the next decoder allocates one
            gc.collect()

    split = dict(compute_devices=compute, attention_devices=attention, shard_by=shard_by)
    plain = tokens_per_s(lambda b: OffloadedDecoder(params, config, batch=b, **split), batch)
    overlapped = tokens_per_s(
        lambda b: OverlappedDecoder(params, config, batch=b, micro_batches=micro_batches, **split),
        batch,
    )
    colocated = tokens_per_s(
        lambda b: OffloadedDecoder(
            params, config, batch=b, compute_devices=devices[:1], attention_devices=devices[:1]
        ),
        colocated_batch,
    ) if colocated_batch else "no sequence fits one device beside the weights"  # fmt: skip
    # The usual alternative on the same devices: each holds the model and its share of the
    # batch (as many sequences as fit one device beside the weights).
    parallel_batch = colocated_batch * len(devices)
    data_parallel = tokens_per_s(
        lambda b: DataParallelDecoder(params, config, devices=devices, batch=b), parallel_batch
    ) if colocated_batch else "no sequence fits one device beside the weights"  # fmt: skip
    ratio = (
        overlapped / plain if isinstance(plain, float) and isinstance(overlapped, float) else None
    )
    return dict(
        platform=devices[0].platform,
        compute_devices=len(compute),
        attention_devices=len(attention),
        batch=batch,
        colocated_batch=colocated_batch,
        batch_ratio=batch / colocated_batch if colocated_batch else None,
        context=start,
        micro_batches=micro_batches,
        shard_by=shard_by,
        config=dataclasses.asdict(config),
        weights_bytes=weights,
        device_memory_bytes=memory,
        device_memory_source=source,
        tokens_per_s_plain=plain,
        tokens_per_s_overlapped=overlapped,
        tokens_per_s_colocated=colocated,
        data_parallel_batch=parallel_batch,
        tokens_per_s_data_parallel=data_parallel,
        overlap_speedup=ratio,
    )


def run_decode_demo(
    devices: int = 8,
    *,
    batch: int = 8,
    prompt_len: int = 8,
    steps: int = 40,
    progress: bool = True,
) -> dict:
    """All three parts; returns the tables (printed by `decode_demo`)."""
    found = demo_devices(devices)
    max_len = -(-(prompt_len + steps) // CACHE_ROUNDING) * CACHE_ROUNDING
    config = GPTConfig(layers=2, heads=8, kv_heads=2, head_dim=32, max_len=max_len)
    rng = np.random.default_rng(0)
    precision = jax.config.jax_default_matmul_precision
    return dict(
        devices=len(found),
        platform=found[0].platform,
        matmul_precision=precision,
        tolerance=logit_tolerance(found[0].platform, config.dtype, precision),
        config=config.__dict__,
        correctness=correctness(found, rng),
        capacity=capacity(found, config, batch),
        generation=generation(found, config, batch, prompt_len, steps, progress),
    )


def decode_demo(devices: int = 8, steps: int = 40, note: str | None = None) -> dict:
    result = run_decode_demo(devices, steps=steps)
    print(f"\noffloaded decode on {result['devices']} {result['platform']} devices")
    if note:
        print(f"({note})")
    if result["devices"] < devices:
        print(f"(asked for {devices} devices, found {result['devices']})")
    print("\n1. sharded decode attention vs one device (B=4, N=32, K=8, H=64, S=512, f32,")
    print("   lengths 0/37/300/512: an empty sequence and shards with no keys)")
    print(f"{'devices':>8} {'heads |err|':>12} {'sequence |err|':>15}")
    by_n: dict[int, dict] = {}
    for r in result["correctness"]:
        by_n.setdefault(r["devices"], {})[r["shard_by"]] = r["max_error"]
    for n, errs in by_n.items():
        print(f"{n:>8} {errs['heads']:>12.1e} {errs['sequence']:>15.1e}")

    print("\n2. KV capacity per number of attention devices (cache sharded by sequence)")
    print(
        f"{'devices':>8} {'demo cache B/device':>20} {'Llama-3-70B tokens in':>22}"
        f" (KV {result['capacity'][0]['llama3_70b_kv_bytes_per_token'] // 1024} KiB/token,"
        f" {result['capacity'][0]['device_memory_bytes'] / 1e9:.1f} GB/device:"
        f" {result['capacity'][0]['device_memory_source']})"
    )
    for r in result["capacity"]:
        print(
            f"{r['devices']:>8} {r['demo_cache_bytes_per_device']:>20,} "
            f"{r['llama3_70b_tokens_that_fit']:>22,}"
        )

    c = result["config"]
    print(
        f"\n3. generation: GPT L={c['layers']} N={c['heads']} K={c['kv_heads']} "
        f"H={c['head_dim']} {c['dtype']} (random weights), B=8; weights on the compute devices,"
        " KV cache + attention on the attention devices"
    )
    header = (
        f"{'sharding':>9} {'compute':>8} {'attn':>5} {'tok/s':>8} {'link B/token/layer':>19} "
        f"{'formula':>8} {'link/HBM':>9} {'|logit err|':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in result["generation"]:
        print(
            f"{r['shard_by']:>9} {r['compute_devices']:>8} {r['attention_devices']:>5} "
            f"{r['tokens_per_s']:>8.1f} {r['link_bytes_measured']:>19.0f} "
            f"{r['link_bytes_formula']:>8} {r['link_to_hbm_ratio']:>9.2%} "
            f"{r['max_logit_error']:>12.1e}"
        )
    for r in result["generation"]:
        if r["note"]:
            print(f"  {r['shard_by']}: {r['note']} (sequence sharding has no such cap)")
    lamina = result["generation"][0]["lamina_formula"]
    print(
        f"  Lamina's (2 + 2/G)·e·d = {lamina:.0f} B; sequence sharding sends q, k, v to every "
        "attention device: (n·(1 + 2/G) + 1)·e·d"
    )
    worst = check_errors(result)
    print(
        f"  largest error {worst:.1e} within {result['tolerance']:.1e} (float32 matmuls on "
        f"{result['platform']}, jax_default_matmul_precision={result['matmul_precision']})"
    )
    return result


def check_errors(result: dict) -> float:
    """The largest error of the demo's checks; SystemExit when one is not finite or exceeds
    `result['tolerance']` (`logit_tolerance` of the platform and matmul precision)."""
    errors = [r["max_error"] for r in result["correctness"]] + [
        r["max_logit_error"] for r in result["generation"]
    ]
    if not np.all(np.isfinite(errors)) or max(errors) > result["tolerance"]:
        raise SystemExit(
            f"offloaded decode disagrees with the reference: {max(errors)} > tolerance "
            f"{result['tolerance']} ({result['platform']}, matmul precision "
            f"{result['matmul_precision']})"
        )
    return max(errors)
