"""Flash attention with the options beyond plain causal, side by side on one GPU (issue 14).

    python -m benchmarks.flash_features --json OUT.json

H=128, T=S=4096, B=4, N=16 (16k tokens), bf16, forward and forward+backward (gradients of q, k,
v). Features: soft cap, packed sequences (segment ids; a peer without them gets the same
visibility as a dense boolean mask), a causal sliding window, GQA 8:1, a chunked prefill
(q_offset: the last 1024 queries against 4096 keys; peers without q_offset take bottom-right
causal over the same shapes, which is the same visibility) and an additive bias [1, N, T, S].
Peers: jattn mosaic, jattn auto, tokamax mosaic, cuDNN (through jax.nn) where it serves the
feature; a peer that declines records its error. TFLOP/s count the dense product (halved when
causal: the FlashAttention convention) whatever else the feature hides, the same for every peer
of a row: a row compares peers, not features.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp

import jattn
from benchmarks import flash
from jattn.demo import environment

BATCH, LENGTH, HEADS, HEAD_DIM = 4, 4096, 16, 128
WINDOW = 1024
CHUNK = 1024  # chunked prefill: queries per chunk


def _segments(batch: int, length: int) -> jax.Array:
    """[B, T] int32: four packed sequences of unequal lengths per row."""
    bounds = jnp.array([0, 700, 1900, 2600], jnp.int32) * length // 4096
    ids = jnp.sum(jnp.arange(length)[:, None] >= bounds[None, :], axis=1) - 1
    return jnp.broadcast_to(ids, (batch, length)).astype(jnp.int32)


def features(batch: int, length: int) -> dict[str, dict]:
    """name -> dict(causal, q_len, kv_heads, jattn: options, peer: options for peers without
    jattn's). Array options travel as arguments of the timed jit, not as its constants."""
    segments = _segments(batch, length)
    same_segment = segments[:, None, :, None] == segments[:, None, None, :]  # [B, 1, T, S]
    bias = 0.1 * jax.random.normal(jax.random.key(7), (1, HEADS, length, length), jnp.bfloat16)
    chunk = min(CHUNK, length // 4)
    window = min(WINDOW, length // 4)
    return {
        "causal": dict(causal=True, jattn={}, peer={}),
        "soft_cap": dict(causal=True, jattn=dict(logits_soft_cap=30.0), peer=dict(softcap=30.0)),
        "segments": dict(
            causal=True, jattn=dict(segment_ids=(segments, segments)), peer=dict(mask=same_segment)
        ),
        "window": dict(
            causal=True,
            jattn=dict(local_window_size=(window, 0)),
            peer=dict(local_window_size=(window, 0)),
        ),
        "gqa_8_to_1": dict(causal=True, kv_heads=HEADS // 8, jattn={}, peer={}),
        "q_offset": dict(
            causal=True,
            q_len=chunk,
            jattn=dict(q_offset=jnp.full((batch,), length - chunk, jnp.int32)),
            peer=dict(bottom_right=True),
        ),
        "bias": dict(causal=False, jattn=dict(bias=bias), peer=dict(bias=bias)),
    }


def _split(options: dict) -> tuple[dict, dict]:
    """(static options, array options) of a feature's options."""

    def is_array(x):
        return isinstance(x, jax.Array) or (
            isinstance(x, tuple) and all(isinstance(y, jax.Array) for y in x)
        )

    arrays = {k: v for k, v in options.items() if is_array(v)}
    return {k: v for k, v in options.items() if k not in arrays}, arrays


def timed_fn(peer, q, feature: dict, mode: str) -> Callable:
    """The jitted function of (q, k, v, jattn arrays, peer arrays) a row times: the forward, or
    the gradients of q, k, v. Arrays travel as arguments, not as constants."""
    causal = feature["causal"]
    static_j, arrays_j = _split(feature["jattn"])
    static_p, arrays_p = _split(feature["peer"])

    def forward(q, k, v, arrays_j, arrays_p):
        return peer(q, k, v, causal, {**static_j, **arrays_j}, {**static_p, **arrays_p})

    if mode == "fwd":
        return jax.jit(forward)
    d_out = jax.random.normal(jax.random.key(9), q.shape, q.dtype).astype(jnp.float32)

    def loss(q, k, v, arrays_j, arrays_p):
        return jnp.sum(forward(q, k, v, arrays_j, arrays_p).astype(jnp.float32) * d_out)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def arrays_of(feature: dict) -> tuple[dict, dict]:
    """The array options (jattn's, the peers') that a row's functions take as arguments."""
    return _split(feature["jattn"])[1], _split(feature["peer"])[1]


def _jattn(implementation):
    def run(q, k, v, causal, options, _peer_options):  # jattn takes every feature itself
        options = dict(options)
        bias = options.pop("bias", None)
        return jattn.dot_product_attention(
            q, k, v, bias, is_causal=causal, implementation=implementation, **options
        )

    return run


def _tokamax(q, k, v, causal, _options, options):
    import tokamax

    options = dict(options)
    if options.pop("bottom_right", False):  # tokamax's causal mask is top-left: offset it
        t, s = q.shape[1], k.shape[1]
        rows, cols = jnp.arange(t)[:, None] + (s - t), jnp.arange(s)[None, :]
        options["mask"] = (cols <= rows)[None, None]
        causal = False
    softcap = options.pop("softcap", None)
    return tokamax.dot_product_attention(
        q, k, v, is_causal=causal, logits_soft_cap=softcap, implementation="mosaic", **options
    )


def _cudnn(q, k, v, causal, _options, options):
    options = dict(options)
    if options.pop("softcap", None) is not None:
        raise NotImplementedError("jax.nn.dot_product_attention has no soft cap")
    if options.pop("bottom_right", False) and q.shape[1] != k.shape[1]:
        raise NotImplementedError("jax.nn's causal mask is top-left for T != S")
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn", **options
    )


PEERS = {
    "jattn_mosaic": _jattn("mosaic"),
    "jattn_auto": _jattn(None),
    "tokamax_mosaic": _tokamax,
    "cudnn": _cudnn,
}


def run_rows(args, save) -> list[dict]:
    rows = []
    for name, feature in features(args.batch, args.length).items():
        if getattr(args, "features", None) and name not in args.features:
            continue
        q_len = feature.get("q_len", args.length)
        kv_heads = feature.get("kv_heads", HEADS)
        keys = jax.random.split(jax.random.key(q_len + kv_heads), 3)
        q = jax.random.normal(keys[0], (args.batch, q_len, HEADS, HEAD_DIM), jnp.bfloat16)
        k, v = (
            jax.random.normal(key, (args.batch, args.length, kv_heads, HEAD_DIM), jnp.bfloat16)
            for key in keys[1:]
        )
        flops = flash.forward_flops(
            args.batch, HEADS, q_len, args.length, HEAD_DIM, feature["causal"]
        )
        for mode in args.modes:
            fns = {peer: timed_fn(PEERS[peer], q, feature, mode) for peer in args.peers}
            call_args = (q, k, v, *arrays_of(feature))
            if args.verbose:  # each peer alone, so that a failure's traceback is printed
                for fn in fns.values():
                    try:
                        jax.block_until_ready(fn(*call_args))
                    except Exception:
                        traceback.print_exc()
            # timed in rounds, so that clock drift moves every peer of the row alike
            results = flash.time_ms_together(fns, call_args, args.repeats)
            for peer_name, result in results.items():
                row = dict(feature=name, peer=peer_name, mode=mode, q_len=q_len, kv_heads=kv_heads)
                if isinstance(result, str):  # a peer that declines or fails: why
                    row.update(error=result)
                else:
                    scale = 1.0 if mode == "fwd" else 3.5
                    row.update(ms=result, tflops=scale * flops / result / 1e9)
                rows.append(row)
                print(json.dumps(row), flush=True)
            save(rows)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", required=True)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--batch", type=int, default=BATCH, help="smaller for a CPU smoke run")
    parser.add_argument("--length", type=int, default=LENGTH)
    parser.add_argument(
        "--features", nargs="+", help="run only these rows (default: all; see features())"
    )
    args = parser.parse_args(argv)
    known = list(features(1, 16))
    unknown = sorted(set(args.features or ()) - set(known))
    if unknown:
        parser.error(f"unknown features {unknown}; known: {known}")
    shape = dict(batch=args.batch, length=args.length, heads=HEADS, head_dim=HEAD_DIM)
    report = dict(environment(), benchmark="flash_features", shape=shape, dtype="bfloat16")

    def save(rows):
        report["rows"] = rows
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    run_rows(args, save)


if __name__ == "__main__":
    main()
