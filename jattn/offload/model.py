"""Attention offloading for a decoder (after Lamina, Chen et al. 2024/2025, arXiv 2405.01814).

A small GPT whose weights, projections and MLP live on a *compute* mesh while the KV cache and
attention live on an *attention* mesh. Per layer and decode step only q, k, v cross to the
attention devices and the attention output comes back: (2 + 2/G)·e·d bytes per token per layer
(d = N·H model width, G = N/K, e bytes per element) with head sharding. The two meshes are
disjoint sets of devices; arrays move between them with `jax.device_put` to a `NamedSharding`
(no pmap), and each side runs its own jit-compiled functions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn import reference
from jattn.attention import dot_product_attention

# The unchecked steps: `step` checks the host copy of the lengths itself (no device read-back).
from jattn.offload.sharded import KVCache, cache_spec, make_mesh, striped
from jattn.offload.sharded import _advance as advance
from jattn.offload.sharded import _append_and_attend as append_and_attend


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256  # bytes
    layers: int = 2
    heads: int = 8  # N
    kv_heads: int = 2  # K
    head_dim: int = 32  # H
    max_len: int = 256  # positions (learned embedding) = cache capacity
    mlp_ratio: int = 4
    dtype: str = "float32"

    @property
    def width(self) -> int:  # d = N * H
        return self.heads * self.head_dim


def init_params(config: GPTConfig, key: jax.Array) -> dict:
    """Random weights (scaled so activations stay O(1)); a pytree of arrays."""
    d, dtype = config.width, jnp.dtype(config.dtype)
    kv = config.kv_heads * config.head_dim
    keys = iter(jax.random.split(key, 3 + 6 * config.layers))

    def dense(shape):
        return (jax.random.normal(next(keys), shape) * shape[0] ** -0.5).astype(dtype)

    layers = [
        dict(
            wq=dense((d, d)),
            wk=dense((d, kv)),
            wv=dense((d, kv)),
            wo=dense((d, d)),
            w1=dense((d, config.mlp_ratio * d)),
            w2=dense((config.mlp_ratio * d, d)),
        )
        for _ in range(config.layers)
    ]
    return dict(
        embed=dense((config.vocab, d)) * d**0.5 / 4,
        pos=dense((config.max_len, d)) * d**0.5 / 4,
        unembed=dense((d, config.vocab)),
        layers=layers,
    )


def _norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def _qkv(layer: dict, x: jax.Array, config: GPTConfig):
    """x `[..., d]` -> q `[..., N, H]`, k, v `[..., K, H]`."""
    h = _norm(x)
    q = (h @ layer["wq"]).reshape(*x.shape[:-1], config.heads, config.head_dim)
    k = (h @ layer["wk"]).reshape(*x.shape[:-1], config.kv_heads, config.head_dim)
    v = (h @ layer["wv"]).reshape(*x.shape[:-1], config.kv_heads, config.head_dim)
    return q, k, v


def _after_attention(layer: dict, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Residual + output projection, then the MLP block."""
    x = x + attn.reshape(*x.shape) @ layer["wo"]
    return x + jax.nn.gelu(_norm(x) @ layer["w1"]) @ layer["w2"]


def _after_attention_then_qkv(layer: dict, following: dict, x, attn, config: GPTConfig):
    """`_after_attention` of one layer, then `_qkv` of the following one: (x, q, k, v)."""
    x = _after_attention(layer, x, attn)
    return (x, *_qkv(following, x, config))


def forward(params: dict, tokens: jax.Array, config: GPTConfig) -> jax.Array:
    """Whole-sequence causal forward on one device (the oracle for the offloaded decoder).

    tokens `[B, T]` -> logits `[B, T, vocab]` float32.
    """
    x = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]
    for layer in params["layers"]:
        q, k, v = _qkv(layer, x, config)
        attn = reference.dot_product_attention(q, k, v, is_causal=True)
        x = _after_attention(layer, x, attn.reshape(*x.shape))
    return (_norm(x) @ params["unembed"]).astype(jnp.float32)


def _prefill(
    params: dict, tokens: jax.Array, config: GPTConfig, implementation, padded: int, stripes: int
):
    """The prompt's forward on the compute devices: last-token logits `[B, vocab]` and every
    layer's k, v stacked `[L, B, padded, K, H]` (zeros past T0), in `stripes` blocks along the
    tokens (`striped`: block d holds tokens d, d + stripes, ..., as a striped cache's device d
    holds them; 1: natural order)."""
    length = tokens.shape[1]
    x = params["embed"][tokens] + params["pos"][None, :length]
    keys, values = [], []
    for layer in params["layers"]:
        q, k, v = _qkv(layer, x, config)
        attn = dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
        x = _after_attention(layer, x, attn)
        keys.append(k)
        values.append(v)
    pad = [(0, 0), (0, 0), (0, padded - length), (0, 0), (0, 0)]
    keys, values = (striped(jnp.pad(jnp.stack(t), pad), stripes, 2) for t in (keys, values))
    return (_norm(x[:, -1]) @ params["unembed"]).astype(jnp.float32), keys, values


@functools.partial(jax.jit, static_argnames="length", donate_argnums=0)
def _write_prompt(cache: KVCache, keys: jax.Array, values: jax.Array, length: int) -> KVCache:
    """On the attention devices: the prompt's k, v `[L, B, T, K, H]` (`_prefill`'s, cut as
    `prompt_spec` says: by kv heads with T = length, or by tokens in striped blocks with T the
    padded length) into the first local slots of every layer of an empty cache (in place),
    lengths = length."""
    spec = cache_spec(cache.shard_by, cache.axis)

    def local(c, new):  # this device's slots [0, its share of the prompt)
        return c.at[:, : new.shape[1]].set(new.astype(c.dtype))

    write_layer = jax.shard_map(
        local,
        mesh=cache.mesh,
        in_specs=(spec, P(*prompt_spec(cache)[1:])),
        out_specs=spec,
        check_vma=False,
    )

    def write(layers, new):
        return tuple(write_layer(c, new[i]) for i, c in enumerate(layers))

    return dataclasses.replace(
        cache,
        keys=write(cache.keys, keys),
        values=write(cache.values, values),
        lengths=jnp.full_like(cache.lengths, length),
    )


def prompt_spec(cache: KVCache) -> P:
    """How a prompt's k, v `[L, B, T, K, H]` are cut over the attention devices."""
    if cache.shard_by == "sequence":
        return P(None, None, cache.axis, None, None)
    return P(None, None, None, cache.axis, None)


def split_devices(devices, num_attention: int | None = None) -> tuple[list, list]:
    """(compute devices, attention devices). Default: half for attention, at least one each;
    a single device serves both (co-located)."""
    devices = list(devices)
    if len(devices) == 1:
        return devices, devices
    n_attn = num_attention or max(1, len(devices) // 2)
    if not 1 <= n_attn < len(devices):
        raise ValueError(f"num_attention must be in [1, {len(devices) - 1}], got {n_attn}")
    return devices[: len(devices) - n_attn], devices[len(devices) - n_attn :]


def compute_devices_for_batch(batch: int, available: int) -> int:
    """How many of `available` compute devices a batch of `batch` sequences is split over: the
    largest count <= available that divides the batch (the batch axis shards evenly)."""
    if batch < 1 or available < 1:
        raise ValueError(f"need batch >= 1 and compute devices >= 1, got {batch}, {available}")
    return max(m for m in range(1, min(batch, available) + 1) if batch % m == 0)


def link_bytes_formula(config: GPTConfig, shard_by: str = "heads", attn_devices: int = 1) -> int:
    """Bytes crossing compute <-> attention per token per layer.

    Head sharding (Lamina): q (d) + k, v (d/G each) out, attention output (d) back:
    (2 + 2/G)·e·d. Sequence sharding sends q, k, v to every attention device (each needs the
    whole query; the slot owner keeps k, v): (n·(1 + 2/G) + 1)·e·d.
    """
    d, e = config.width, jnp.dtype(config.dtype).itemsize
    g = config.heads // config.kv_heads
    to_attention = d + 2 * d // g
    if shard_by == "sequence":
        to_attention *= attn_devices
    return (to_attention + d) * e


class OffloadedDecoder:
    """Greedy decoding with attention offloaded to `attn_mesh`, everything else on `compute_mesh`.

    Weights are replicated on the compute mesh and activations split over its devices by batch
    (over the largest number of the given compute devices that divides B, see
    `compute_devices_for_batch`; the rest are `idle_compute_devices`); the `KVCache` is
    sharded over the attention mesh by heads or sequence.
    `link_bytes` counts the bytes that land on the other mesh (sum of the shards' sizes) for
    every transfer, so `link_bytes_per_token_layer()` is a measurement to set beside
    `link_bytes_formula`.
    """

    def __init__(
        self,
        params: dict,
        config: GPTConfig,
        *,
        compute_devices,
        attention_devices,
        batch: int,
        shard_by: str = "heads",
        implementation: str | None = None,
        prefill_implementation: str | None = None,
    ):
        self.config, self.batch, self.implementation = config, batch, implementation
        self.prefill_implementation = prefill_implementation
        # Activations are split by batch over the compute devices. When B does not divide them
        # (B = 4 over 3), the decoder uses the largest count that divides B (2 of 3) rather
        # than replicating: replicated activations would repeat the MLP on every device and
        # bring the attention output back once per device, off `link_bytes_formula`.
        compute_devices = list(compute_devices)
        used = compute_devices_for_batch(batch, len(compute_devices))
        self.idle_compute_devices = compute_devices[used:]
        self.compute_mesh: Mesh = make_mesh(compute_devices[:used], "compute")
        self.attn_mesh: Mesh = make_mesh(attention_devices, "attn")
        self.activations = NamedSharding(self.compute_mesh, P("compute"))
        self.params = jax.device_put(params, NamedSharding(self.compute_mesh, P()))
        self.cache = KVCache.create(
            self.attn_mesh,
            num_layers=config.layers,
            batch=batch,
            capacity=config.max_len,
            kv_heads=config.kv_heads,
            head_dim=config.head_dim,
            dtype=jnp.dtype(config.dtype),
            shard_by=shard_by,
        )
        self.positions = np.zeros(batch, np.int32)  # host copy of cache.lengths (no syncs)
        self.link_bytes = 0
        self.tokens_decoded = 0  # B per step
        self.prefill_link_bytes = 0  # the prompts' KV, counted apart from the decode steps
        self._embed = jax.jit(
            lambda p, t, pos: p["embed"][t] + p["pos"][pos], out_shardings=self.activations
        )
        self._qkv = jax.jit(functools.partial(_qkv, config=config))
        self._after = jax.jit(_after_attention, out_shardings=self.activations)
        # One dispatch between two layers' attention: layer i's output projection and MLP with
        # layer i+1's q, k, v (a step is host-bound when every small op is its own dispatch).
        self._after_qkv = jax.jit(
            functools.partial(_after_attention_then_qkv, config=config),
            out_shardings=(self.activations, None, None, None),
        )
        self._logits = jax.jit(lambda p, x: (_norm(x) @ p["unembed"]).astype(jnp.float32))
        self._prefill = None  # compiled on first use
        self._step_logits = None  # set by the last stage of step_stages

    def _move(self, x, sharding, counter: str = "link_bytes"):
        moved = jax.device_put(x, sharding, may_alias=False)  # a transfer, never a view
        nbytes = sum(
            s.data.nbytes for leaf in jax.tree.leaves(moved) for s in leaf.addressable_shards
        )
        setattr(self, counter, getattr(self, counter) + nbytes)
        return moved

    def prefill(self, prompt) -> jax.Array:
        """Run the whole prompt `[B, T0]` at once on the compute devices (causal flash attention:
        `jattn.dot_product_attention`, `prefill_implementation`) and hand its KV cache to the
        attention devices in one transfer; returns the logits after the last prompt token
        `[B, vocab]` (float32). The cache must be empty; `step` continues from position T0.

        The transfer carries the prompt's k and v of every layer, `[L, B, T0, K, H]` each, cut
        over the attention devices as the cache is (by kv heads, or by sequence with T0 padded
        to a multiple of their number, in the cache's striped order); `prefill_link_bytes`
        counts it.
        """
        prompt = np.asarray(prompt)
        if prompt.ndim != 2 or prompt.shape[0] != self.batch or prompt.dtype.kind not in "iu":
            raise ValueError(
                f"prefill needs integer tokens [B, T0] with B = {self.batch}, got "
                f"{prompt.dtype} {prompt.shape}"
            )
        length = prompt.shape[1]
        if not 1 <= length <= self.config.max_len:
            raise ValueError(
                f"prefill: the prompt length T0 = {length} must lie in [1, max_len = "
                f"{self.config.max_len}] (prompt {prompt.shape})"
            )
        if self.positions.any():
            raise ValueError(
                f"prefill writes an empty cache; this one holds {self.positions.tolist()} tokens"
            )
        n_attn = self.attn_mesh.shape["attn"]
        padded, stripes = length, 1
        if self.cache.shard_by == "sequence":  # striped blocks of T0 padded to n
            padded, stripes = -(-length // n_attn) * n_attn, n_attn
        tokens = jax.device_put(jnp.asarray(prompt, jnp.int32), self.activations)
        if self._prefill is None:
            self._prefill = jax.jit(
                functools.partial(
                    _prefill, config=self.config, implementation=self.prefill_implementation
                ),
                static_argnames=("padded", "stripes"),
            )
        logits, keys, values = self._prefill(self.params, tokens, padded=padded, stripes=stripes)
        keys, values = self._move(
            (keys, values),
            NamedSharding(self.attn_mesh, prompt_spec(self.cache)),
            "prefill_link_bytes",
        )
        self.cache = _write_prompt(self.cache, keys, values, length=length)
        self.positions = np.full(self.batch, length, np.int32)
        return logits

    def start_at(self, length: int) -> None:
        """Count the first `length` slots of the (empty) cache as context without computing
        them: they hold zeros, and `step` goes on from position `length`. What decoding at a
        long context costs, for benchmarks, without a prefill of B x length tokens first.

        Raises ValueError unless the cache is empty and 0 <= length < max_len.
        """
        if not 0 <= length < self.config.max_len or self.positions.any():
            raise ValueError(
                f"start_at needs an empty cache and 0 <= length < max_len = "
                f"{self.config.max_len}; got length {length}, cache lengths "
                f"{self.positions.tolist()}"
            )
        lengths = np.full(self.batch, length, np.int32)
        self.cache = dataclasses.replace(
            self.cache, lengths=jax.device_put(lengths, self.cache.lengths.sharding)
        )
        self.positions = np.full(self.batch, length, np.int32)

    def step(self, tokens) -> jax.Array:
        """Feed one token per sequence `[B]`; returns next-token logits `[B, vocab]` (float32)."""
        stages = self.step_stages(tokens)
        for _ in stages:
            pass
        return self._step_logits

    def step_stages(self, tokens):
        """`step` as a generator that pauses after dispatching each layer's attention (JAX
        dispatch is asynchronous: the attention devices are then busy while the caller
        dispatches other work to the compute devices). Drive it to the end; the logits are
        then in `self._step_logits`. `OverlappedDecoder` interleaves several of these."""
        if (self.positions >= self.config.max_len).any():
            raise ValueError(f"the KV cache is full ({self.config.max_len} positions)")
        tokens = jax.device_put(jnp.asarray(tokens, jnp.int32), self.activations)
        positions = jax.device_put(jnp.asarray(self.positions), self.activations)
        x = self._embed(self.params, tokens, positions)  # [B, d] on the compute mesh
        to_attn = self.cache.token_sharding()
        layers = self.params["layers"]
        q, k, v = self._qkv(layers[0], x)
        for i, layer in enumerate(layers):
            q, k, v = self._move((q, k, v), to_attn)  # one transfer of the three
            self.cache, out = append_and_attend(
                self.cache, i, q, k, v, implementation=self.implementation
            )
            out = self._move(out, self.activations)
            yield i
            if i + 1 < len(layers):
                x, q, k, v = self._after_qkv(layer, layers[i + 1], x, out)
            else:
                x = self._after(layer, x, out)
        self.cache = advance(self.cache)
        self.positions = self.positions + 1  # a new array: never mutate what JAX may still read
        self.tokens_decoded += self.batch
        self._step_logits = self._logits(self.params, x)

    def generate(self, prompt, steps: int, progress=None, prefill: bool = False) -> np.ndarray:
        """Greedy: feed `prompt` `[B, T0]`, then `steps` generated tokens.

        The prompt goes in token by token through `step`, or with `prefill=True` in one
        `prefill` (one compute pass, one KV transfer; the cache must be empty).
        Returns `[B, T0 + steps]`. `progress` is called once per step (e.g. a tqdm update; once
        for the whole prefill).
        """
        prompt = np.asarray(prompt, np.int32)
        tokens = [prompt[:, i] for i in range(prompt.shape[1])]
        logits = None
        if prefill:
            logits = self.prefill(prompt)
            if progress:
                progress()
        else:
            for t in tokens:
                logits = self.step(t)
                if progress:
                    progress()
        for _ in range(steps):
            nxt = np.asarray(jnp.argmax(logits, -1), np.int32)
            tokens.append(nxt)
            logits = self.step(nxt)
            if progress:
                progress()
        self.last_logits = logits
        return np.stack(tokens, 1)

    def link_bytes_per_token_layer(self) -> float:
        return self.link_bytes / max(1, self.tokens_decoded * self.config.layers)


class OverlappedDecoder:
    """Lamina's staggered pipelining: the batch is cut into `micro_batches` micro-batches, each
    an `OffloadedDecoder` of B/m sequences with its own KV cache (on the same attention devices,
    sharing the weights on the same compute devices). A step interleaves their layers: once
    micro-batch j's attention for layer i is dispatched to the attention devices, the compute
    devices go on with micro-batch j+1's MLP of layer i-1 and projections of layer i, so both
    sides are busy at once and the link transfers overlap compute. JAX dispatch is
    asynchronous and each device runs its queue in order, so the order of dispatch is the
    schedule: embed/qkv(0, layer 0), attention(0, 0); embed/qkv(1, 0), attention(1, 0);
    after(0, 0) + qkv(0, 1), attention(0, 1); ...

    Results equal `OffloadedDecoder` on the whole batch (each sequence's arithmetic is the same).
    `step`, `prefill`, `generate`, `link_bytes_per_token_layer` as there.
    """

    def __init__(self, params: dict, config: GPTConfig, *, batch: int, micro_batches: int = 2,
                 **kwargs):  # fmt: skip
        if not isinstance(micro_batches, int) or micro_batches < 1 or batch % micro_batches:
            raise ValueError(
                f"micro_batches must be an int >= 1 that divides the batch B = {batch}, got "
                f"{micro_batches!r}"
            )
        self.config, self.batch, self.micro_batches = config, batch, micro_batches
        size = batch // micro_batches
        first = OffloadedDecoder(params, config, batch=size, **kwargs)
        # The placed weights go to the same sharding again: no copy, one set of weights.
        self.parts = [first] + [
            OffloadedDecoder(first.params, config, batch=size, **kwargs)
            for _ in range(micro_batches - 1)
        ]
        self.compute_mesh, self.attn_mesh = first.compute_mesh, first.attn_mesh

    def _split(self, x) -> list[np.ndarray]:
        return np.split(np.asarray(x, np.int32), self.micro_batches)

    def step(self, tokens) -> jax.Array:
        """One token per sequence `[B]` -> next-token logits `[B, vocab]`, micro-batches
        interleaved layer by layer (see the class docstring)."""
        stages = [
            part.step_stages(t) for part, t in zip(self.parts, self._split(tokens), strict=True)
        ]
        running = list(stages)
        while running:  # round robin: each resume dispatches after(i-1) + qkv(i) + attention(i)
            for stage in list(running):
                if next(stage, None) is None:
                    running.remove(stage)
        return self._gather([part._step_logits for part in self.parts])

    def _gather(self, logits: list[jax.Array]) -> jax.Array:
        return jnp.concatenate(logits)

    def prefill(self, prompt) -> jax.Array:
        """`OffloadedDecoder.prefill` per micro-batch; logits `[B, vocab]`."""
        parts = self._split(prompt)
        return self._gather([p.prefill(x) for p, x in zip(self.parts, parts, strict=True)])

    def start_at(self, length: int) -> None:
        """`OffloadedDecoder.start_at` for every micro-batch."""
        for part in self.parts:
            part.start_at(length)

    generate = OffloadedDecoder.generate

    @property
    def link_bytes(self) -> int:
        return sum(part.link_bytes for part in self.parts)

    @property
    def tokens_decoded(self) -> int:
        return sum(part.tokens_decoded for part in self.parts)

    def link_bytes_per_token_layer(self) -> float:
        return self.link_bytes / max(1, self.tokens_decoded * self.config.layers)


class DataParallelDecoder(OverlappedDecoder):
    """The usual alternative to offloading: every device holds the whole model and decodes its
    own B/n sequences with its own KV cache, co-located, and nothing crosses between devices.
    Each part is an `OffloadedDecoder` whose compute and attention device is the same one.
    `step` dispatches their layers interleaved (as `OverlappedDecoder` does with its
    micro-batches), so the devices run at once; the logits `[B, vocab]` are gathered on the
    first device. Results equal `OffloadedDecoder` on the whole batch. Raises ValueError unless
    B divides over the devices.
    """

    def __init__(self, params: dict, config: GPTConfig, *, devices, batch: int, **kwargs):
        devices = list(devices)
        if not devices or batch % len(devices):
            raise ValueError(
                f"data parallelism needs the batch B = {batch} divisible by the {len(devices)} "
                "devices"
            )
        self.config, self.batch, self.micro_batches = config, batch, len(devices)
        self.devices = devices
        self.parts = [
            OffloadedDecoder(params, config, batch=batch // len(devices), compute_devices=[d],
                             attention_devices=[d], **kwargs)
            for d in devices
        ]  # fmt: skip

    def _gather(self, logits: list[jax.Array]) -> jax.Array:
        first = logits[0].sharding
        return jnp.concatenate([jax.device_put(x, first) for x in logits])
