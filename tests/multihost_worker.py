"""One process of the multi-controller test (tests/test_multihost.py starts several).

    python tests/multihost_worker.py COORDINATOR_PORT NUM_PROCESSES PROCESS_ID OUT.npz [gpu]

(4 CPU devices per process; with `gpu`, GPU number PROCESS_ID alone.)

Every process runs the same program on the global mesh over all processes' CPU devices
(`jax.distributed.initialize`); process 0 writes the gathered results. `compute()` is also what
the test runs in a single process to get the results to compare with.
"""

from __future__ import annotations

import os
import sys

import numpy as np

BATCH, HEADS, KV_HEADS, DIM, CAPACITY, STEPS = 3, 16, 8, 16, 32, 5
RING_LENGTH = 64  # causal zig-zag: 2n chunks of 4 tokens on 8 devices
LENGTHS = np.array([0, 3, 27])  # empty, inside one device's slots, spanning most devices


def data():
    rng = np.random.default_rng(1234)  # the same in every process
    q = rng.standard_normal((BATCH, HEADS, DIM)).astype(np.float32)
    k = rng.standard_normal((BATCH, CAPACITY, KV_HEADS, DIM)).astype(np.float32)
    v = rng.standard_normal((BATCH, CAPACITY, KV_HEADS, DIM)).astype(np.float32)
    new = rng.standard_normal((STEPS, 2, BATCH, KV_HEADS, DIM)).astype(np.float32)
    return q, k, v, new


def compute() -> dict[str, np.ndarray]:
    """Sharded decode (both shardings) and a few cache append+attend steps on all devices."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding

    from jattn import offload

    q, k, v, new = data()
    mesh = offload.make_mesh(jax.devices())

    def put(x, spec):  # every process holds the whole host array; each places its shards
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def fetch(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    P = jax.sharding.PartitionSpec
    results = {}
    for shard_by in ("heads", "sequence"):
        spec = offload.cache_spec(shard_by, "attn")
        out, lse = offload.sharded_decode_attention(
            put(q, P()),
            put(k, spec),
            put(v, spec),
            put(LENGTHS, P()),
            mesh=mesh,
            shard_by=shard_by,
            return_residual=True,
        )
        results[f"{shard_by}_out"], results[f"{shard_by}_lse"] = fetch(out), fetch(lse)

        cache = offload.KVCache.create(
            mesh,
            num_layers=1,
            batch=BATCH,
            capacity=CAPACITY,
            kv_heads=KV_HEADS,
            head_dim=DIM,
            dtype=np.float32,
            shard_by=shard_by,
            lengths=LENGTHS,
        )
        token = cache.token_sharding()
        for step in range(STEPS):
            k_new, v_new = (
                jax.make_array_from_callback(x.shape, token, lambda index, x=x: x[index])
                for x in new[step]
            )
            cache, out = offload.append_and_attend(cache, 0, put(q, P()), k_new, v_new)
            cache = offload.advance(cache)
        results[f"{shard_by}_cache_out"] = fetch(out)
        results[f"{shard_by}_cache_keys"] = fetch(cache.keys[0])
    results.update(_ring(mesh, put, fetch))
    return results


def _ring(mesh, put, fetch) -> dict[str, np.ndarray]:
    """Causal ring attention over all devices (the mesh axis 'attn' as the ring): the output
    and dq, dk, dv of a weighted sum of it."""
    import jax

    from jattn import parallel

    P = jax.sharding.PartitionSpec
    rng = np.random.default_rng(5678)
    q = rng.standard_normal((1, RING_LENGTH, HEADS // 4, DIM)).astype(np.float32)
    k, v = (
        rng.standard_normal((1, RING_LENGTH, KV_HEADS // 4, DIM)).astype(np.float32)
        for _ in range(2)
    )
    weights = rng.standard_normal(q.shape).astype(np.float32)
    q, k, v, weights = (put(x, P(None, "attn")) for x in (q, k, v, weights))

    def ring(q, k, v):
        return parallel.ring_attention(q, k, v, mesh=mesh, axis="attn", is_causal=True)

    def loss(q, k, v, weights):  # weights an argument: a global array cannot be closed over
        return (ring(q, k, v) * weights).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, weights)
    results = {"ring_out": fetch(jax.jit(ring)(q, k, v))}
    for name, grad in zip(("dq", "dk", "dv"), grads, strict=True):
        results[f"ring_{name}"] = fetch(grad)
    return results


def main() -> None:
    port, num_processes, process_id, out_path = sys.argv[1:5]
    platform = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    per_process = 4 if platform == "cpu" else 1
    if platform == "cpu":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={per_process}"
    import jax

    if platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
        initialization_timeout=60,
        # GPU: one GPU per process, as on a cluster (each process sees only its own)
        local_device_ids=None if platform == "cpu" else [int(process_id)],
    )
    assert jax.process_count() == int(num_processes), jax.process_count()
    assert jax.devices()[0].platform == platform, jax.devices()
    assert len(jax.devices()) == per_process * int(num_processes), jax.devices()
    results = compute()
    if jax.process_index() == 0:
        np.savez(out_path, devices=len(jax.devices()), **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
