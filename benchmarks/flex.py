"""Generated attention variants on one GPU: `jattn.flex_attention` against the native kernel and
against peers given the equivalent dense bias or mask (issue 16).

    python -m benchmarks.flex --json benchmarks/results/flex_h200.json --plot flex_h200.png

Shapes: B=1, N=16 heads of H=128, bf16, T = S from 2k to 16k. Three variants, each forward and
forward+backward (d q, k, v), median ms (`benchmarks.flash.time_ms_together`):
- causal: written as a mask_mod with its block mask, against jattn's native `is_causal` (the
  cost of generality) and cuDNN's causal;
- ALiBi (non-causal, slopes 2^(-8 (h+1) / N)): a score_mod computed in the kernel, against the
  plain kernel without a bias, and cuDNN, XLA and tokamax given the dense `[1, N, T, S]` bias;
- document masking (4 equal documents, non-causal): a mask_mod with its block mask, against
  jattn's `segment_ids`, and cuDNN and XLA given the dense `[1, 1, T, S]` mask.
Each flex variant on the Triton kernel and on the Mosaic GPU one (`implementation='mosaic'`).
Mosaic reads closed-over arrays only per query row and per key (the document ids, not ALiBi's
slopes[h]): its ALiBi computes the slopes from h, and its document mask runs both ways, reading
the ids and computing them from the indices. Dense biases and masks are arguments of the timed
jit, not constants of it. Also the time of `create_block_mask` for the document mask at each T
(jitted). A peer that fails or declines a cell records the error instead of a time.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

import jattn
from benchmarks.flash import time_ms, time_ms_together
from jattn.demo import environment

HEADS, HEAD_DIM, DOCUMENTS = 16, 128, 4
LENGTHS = (2048, 4096, 8192, 16384)


def _slopes(heads: int):
    """ALiBi's head slopes (Press et al., 2022): 2^(-8 (h + 1) / N)."""
    return 2.0 ** (-8.0 * jnp.arange(1, heads + 1, dtype=jnp.float32) / heads)


def _documents(length: int):
    """[1, T] document ids: DOCUMENTS equal documents."""
    return (jnp.arange(length, dtype=jnp.int32) * DOCUMENTS // length)[None]


class Peer(NamedTuple):
    """run(q, k, v, *arrays) -> out; arrays (a dense bias or mask, quadratic in T) are passed
    as arguments of the timed jit, not closed over: a closed-over array is a constant of the
    compiled program (2 GB at T = 8k, minutes of lowering)."""

    run: Callable
    arrays: tuple = ()


def variants(length: int) -> dict[str, dict[str, Peer]]:
    """{variant: {peer: Peer}} at T = S = length."""
    slopes, docs = _slopes(HEADS), _documents(length)
    pos = jnp.arange(length, dtype=jnp.float32)
    alibi_bias = (-slopes[:, None, None] * jnp.abs(pos[None, :, None] - pos[None, None, :]))[None]
    alibi_bias = alibi_bias.astype(jnp.bfloat16)  # [1, N, T, S]
    doc_mask = (docs[0][:, None] == docs[0][None, :])[None, None]  # [1, 1, T, S]

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * jnp.abs(q_idx - kv_idx).astype(jnp.float32)

    def alibi_mod_arithmetic(score, b, h, q_idx, kv_idx):  # no closed-over array: for 'mosaic'
        slope = jnp.exp2(-8.0 * (h + 1).astype(jnp.float32) / HEADS)
        return score - slope * jnp.abs(q_idx - kv_idx).astype(jnp.float32)

    def doc_mod(b, h, q_idx, kv_idx):
        return docs[b, q_idx] == docs[b, kv_idx]

    def doc_mod_arithmetic(b, h, q_idx, kv_idx):  # the same documents from the indices
        return q_idx * DOCUMENTS // length == kv_idx * DOCUMENTS // length

    causal_blocks = jattn.create_block_mask(causal_mod, None, None, length, length)
    doc_blocks = jattn.create_block_mask(doc_mod, 1, None, length, length)

    def flex(implementation, **mods):
        return Peer(
            lambda q, k, v: jattn.flex_attention(q, k, v, implementation=implementation, **mods)
        )

    def jax_nn(implementation, name=None, array=None, **options):
        def run(q, k, v, *arrays):
            dense = {name: arrays[0]} if name else {}
            return jax.nn.dot_product_attention(
                q, k, v, implementation=implementation, **dense, **options
            )

        return Peer(run, () if array is None else (array,))

    def tokamax_bias(q, k, v, bias):
        import tokamax

        return tokamax.dot_product_attention(q, k, v, bias=bias)

    def native(**options):
        return Peer(lambda q, k, v: jattn.dot_product_attention(q, k, v, **options))

    # flex on Mosaic takes the table's non-causal entry; for a causal block mask the causal
    # entry beside it (stop 27: forward 3% faster, 8k backward 5% slower, before the forward's
    # longest-first lists)
    causal_entry = jattn.autotune.lookup(
        "mosaic", head_dim=HEAD_DIM, dtype=jnp.bfloat16, causal=True, length=length
    )
    causal_tuned = {}
    if causal_entry is not None:
        causal_tuned["jattn flex mosaic (mask_mod + block mask, causal entry)"] = flex(
            "mosaic", mask_mod=causal_mod, block_mask=causal_blocks, config=causal_entry
        )

    return {
        "causal": {
            "jattn flex triton (mask_mod + block mask)": flex(
                "triton", mask_mod=causal_mod, block_mask=causal_blocks
            ),
            "jattn flex mosaic (mask_mod + block mask)": flex(
                "mosaic", mask_mod=causal_mod, block_mask=causal_blocks
            ),
            **causal_tuned,
            "jattn native is_causal": native(is_causal=True),
            "jattn native is_causal mosaic": native(is_causal=True, implementation="mosaic"),
            "cudnn is_causal": jax_nn("cudnn", is_causal=True),
        },
        "alibi": {
            "jattn flex triton (score_mod)": flex("triton", score_mod=alibi_mod),
            "jattn flex mosaic (score_mod, slopes from h)": flex(
                "mosaic", score_mod=alibi_mod_arithmetic
            ),
            "jattn plain (no bias)": native(),
            "jattn plain mosaic (no bias)": native(implementation="mosaic"),
            "cudnn dense bias": jax_nn("cudnn", "bias", alibi_bias),
            "xla dense bias": jax_nn("xla", "bias", alibi_bias),
            "tokamax dense bias": Peer(tokamax_bias, (alibi_bias,)),
        },
        "document": {
            "jattn flex triton (mask_mod + block mask)": flex(
                "triton", mask_mod=doc_mod, block_mask=doc_blocks
            ),
            "jattn flex mosaic (mask_mod + block mask)": flex(
                "mosaic", mask_mod=doc_mod, block_mask=doc_blocks
            ),
            "jattn flex mosaic (mask_mod from indices + block mask)": flex(
                "mosaic", mask_mod=doc_mod_arithmetic, block_mask=doc_blocks
            ),
            "jattn segment_ids": native(segment_ids=(docs, docs)),
            "cudnn dense mask": jax_nn("cudnn", "mask", doc_mask),
            "xla dense mask": jax_nn("xla", "mask", doc_mask),
        },
    }


def timed_fn(peer: Peer, q, mode: str) -> Callable:
    """The function of (q, k, v) a cell times: a jit of the forward, or of the gradients of
    q, k, v, called with the peer's dense arrays as arguments."""
    if mode == "fwd":
        jitted = jax.jit(peer.run)
    else:
        d_out = jax.random.normal(jax.random.key(9), q.shape, q.dtype)

        def loss(q, k, v, *arrays):
            out = peer.run(q, k, v, *arrays)
            return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))

        jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda q, k, v: jitted(q, k, v, *peer.arrays)


def block_mask_ms(length: int, repeats: int) -> float:
    """Median ms of a jitted `create_block_mask` for the document mask at T = S = length."""
    docs = _documents(length)

    def build(docs):
        def doc_mod(b, h, q_idx, kv_idx):
            return docs[b, q_idx] == docs[b, kv_idx]

        return jattn.create_block_mask(doc_mod, 1, None, length, length)

    return time_ms(jax.jit(build), (docs,), repeats)


def run_cells(lengths, modes, repeats, on_row=None, only=None, peers_like=None) -> list[dict]:
    """Every variant's peers at each length and mode; only the variants in `only` and the peers
    whose names hold a string of `peers_like`, when given."""
    rows = []

    def add(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for length in lengths:
        keys = jax.random.split(jax.random.key(length), 3)
        shape = (1, length, HEADS, HEAD_DIM)
        q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
        for variant, peers in variants(length).items():
            if only is not None and variant not in only:
                continue
            if peers_like is not None:
                peers = {p: r for p, r in peers.items() if any(s in p for s in peers_like)}
            for mode in modes:  # a variant's peers timed in rounds: clock drift moves them alike
                fns = {peer: timed_fn(run, q, mode) for peer, run in peers.items()}
                for peer, result in time_ms_together(fns, (q, k, v), repeats).items():
                    row = dict(variant=variant, peer=peer, T=length, mode=mode)
                    if isinstance(result, str):  # a peer that declines: why
                        row["error"] = result
                    else:
                        row["ms"] = result
                    add(row)
        try:
            add(dict(variant="create_block_mask", T=length, ms=block_mask_ms(length, repeats)))
        except Exception as err:  # noqa: BLE001
            add(dict(variant="create_block_mask", T=length, error=repr(err)[:400]))
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(v, m) for v in ("causal", "alibi", "document") for m in ("fwd", "fwd+bwd")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    for (variant, mode), ax in zip(cells, axes.T.ravel(), strict=True):
        mine = [r for r in rows if r["variant"] == variant and r.get("mode") == mode]
        for peer in dict.fromkeys(r["peer"] for r in mine):
            points = sorted((r["T"], r["ms"]) for r in mine if r["peer"] == peer and "ms" in r)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=peer)
        ax.set(title=f"{variant}, {mode}", xlabel="T = S", ylabel="ms", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(f"flex_attention, B=1, N={HEADS}, H={HEAD_DIM}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot", default=None, help="PNG path (default: beside the JSON)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="+", default=None, help="causal, alibi, document")
    parser.add_argument("--peers", nargs="+", default=None, help="substrings of peer names")
    parser.add_argument(
        "--block-mask-lengths", type=int, nargs="*", default=[],
        help="more lengths to time create_block_mask at, without the attention cells",
    )  # fmt: skip
    args = parser.parse_args(argv)
    record = dict(environment=environment(), heads=HEADS, head_dim=HEAD_DIM, batch=1, rows=[])

    def save(row):  # after every row: a run cut by a time limit keeps what it measured
        print(row, flush=True)
        record["rows"].append(row)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)

    for length in args.block_mask_lengths:  # cheap: first, before a time limit can cut them
        save(dict(variant="create_block_mask", T=length, ms=block_mask_ms(length, args.repeats)))
    rows = run_cells(
        args.lengths,
        args.modes,
        args.repeats,
        on_row=save,
        only=args.variants,
        peers_like=args.peers,
    )
    plot(rows, args.plot or args.json.rsplit(".", 1)[0] + ".png")


if __name__ == "__main__":
    main()
