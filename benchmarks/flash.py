"""Flash attention side by side on one GPU: TFLOP/s of forward and forward+backward.

    python -m benchmarks.flash --json benchmarks/results/flash_h100.json --plot flash_h100.png

FlashAttention's shapes: 16k tokens (B = 16384 / T) and hidden 2048 (N = 2048 / H), T from 512
to 16k, causal and not. FLOPs by the FlashAttention convention: forward 4·B·N·T·S·H (halved
when causal), backward 2.5× forward, so forward+backward is 3.5× forward. Each time is the
median of repeated timings after a warm-up call, each timing averaging enough back-to-back calls
to last ~20 ms; the peers of a cell are timed in rounds (one timing of each per round), so that
clock drift during a cell moves them alike. Peers that fail or decline a cell record the error
instead of a time.
"""

from __future__ import annotations

import argparse
import functools
import json
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp

import jattn
from jattn.autotune import tuner
from jattn.demo import environment

TOKENS, HIDDEN = 16384, 2048


def qkv(length: int, head_dim: int, dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v [TOKENS // length, length, HIDDEN // head_dim, head_dim] of FlashAttention's
    shapes, standard normal (keys 0, 1, 2): the inputs of the benchmarks/dev A/Bs."""
    shape = (TOKENS // length, length, HIDDEN // head_dim, head_dim)
    return tuple(jax.random.normal(jax.random.key(i), shape, dtype) for i in range(3))


def _jattn(implementation, config=None):
    def run(q, k, v, causal):
        return jattn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation, config=config
        )

    return run


def _jax_nn(implementation):
    def run(q, k, v, causal):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )

    return run


def _jax_pallas_triton(q, k, v, causal):
    from jax.experimental.pallas.ops.gpu import attention

    return attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)


def _jax_mosaic_example(q, k, v, causal):
    """JAX's own Mosaic GPU attention example (Hopper; no softmax scale of its own: q scaled
    first; 64 x 128 tiles, 64 x 64 above H = 128, two stages as its own benchmark runs it)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    block_kv = 128 if q.shape[-1] <= 128 else 64
    config = attention_mgpu.TuningConfig(
        block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=causal
    )
    q = (q * q.shape[-1] ** -0.5).astype(q.dtype)
    return attention_mgpu.attention(q, k, v, config)


def _tokamax(implementation):
    def run(q, k, v, causal):
        import tokamax

        return tokamax.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )

    return run


PEERS: dict[str, Callable] = {
    "jattn_auto": _jattn(None),  # implementation=None: the measured dispatch where one exists
    "jattn_mosaic": _jattn("mosaic"),  # Hopper only
    "jattn_triton": _jattn("triton"),
    "cudnn": _jax_nn("cudnn"),
    "jax_pallas_triton": _jax_pallas_triton,
    "jax_mosaic_example": _jax_mosaic_example,  # Hopper only
    "tokamax_mosaic": _tokamax("mosaic"),
    "tokamax_triton": _tokamax("triton"),
    "xla": _jax_nn("xla"),
}


def time_ms(fn: Callable, args, repeats: int) -> float:
    """Median ms per call: warm-up, then `repeats` timings of enough calls to last ~20 ms
    (`jattn.autotune.tuner.time_ms`, the autotuner's timer)."""
    return tuner.time_ms(functools.partial(fn, *args), repeats)


def time_ms_together(fns: dict[str, Callable], args, repeats: int) -> dict[str, float | str]:
    """Median ms per call of each fn on the same args, timed in rounds: each round takes one
    timing of every fn (enough calls to last ~20 ms, as `time_ms`), so that a drift of the
    GPU's clocks or temperature during a cell moves every peer alike. A fn that fails (to
    compile or run) gets its error message instead (`tuner.time_ms_rounds`)."""
    calls = {name: functools.partial(fn, *args) for name, fn in fns.items()}
    return tuner.time_ms_rounds(calls, repeats)


def record_together(fns: dict[str, Callable], args, repeats: int, cell: dict, rows: list,
                    path: str) -> None:  # fmt: skip
    """`time_ms_together` of fns on one cell (an A/B of `benchmarks/dev`): a row per fn (the
    cell's fields, peer, ms) appended to rows and printed as JSON; rows written to path with
    the environment."""
    for name, ms in time_ms_together(fns, args, repeats).items():
        row = dict(cell, peer=name, ms=ms)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(path, "w") as f:
        json.dump(dict(environment=environment(), rows=rows), f, indent=1)


def forward_flops(batch, heads, q_len, kv_len, head_dim, causal) -> float:
    flops = 4.0 * batch * heads * q_len * kv_len * head_dim
    return flops / 2 if causal else flops


def timed_fn(peer: Callable, q, causal: bool, mode: str) -> Callable:
    """The jitted function of (q, k, v) that a cell times: the forward, or the gradients of
    q, k, v under a fixed random output cotangent."""
    if mode == "fwd":
        return jax.jit(lambda q, k, v: peer(q, k, v, causal))
    d_out = jax.random.normal(jax.random.key(9), q.shape, q.dtype)

    def loss(q, k, v):
        return jnp.sum(peer(q, k, v, causal).astype(jnp.float32) * d_out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(peer: Callable, q, k, v, causal: bool, mode: str, repeats: int) -> float:
    return time_ms(timed_fn(peer, q, causal, mode), (q, k, v), repeats)


def measure_together(peers: dict[str, Callable], q, k, v, causal, mode, repeats) -> dict:
    """`time_ms_together` of the peers on one cell: name -> ms, or the error of a peer that
    cannot run it."""
    fns = {name: timed_fn(peer, q, causal, mode) for name, peer in peers.items()}
    return time_ms_together(fns, (q, k, v), repeats)


def run_cells(args, on_row: Callable | None = None) -> list[dict]:
    rows = []
    cells = [
        (h, t, c, m)
        for h in args.head_dims
        for t in args.lengths
        for c in args.causal
        for m in args.modes
    ]
    try:
        from tqdm import tqdm

        cells = tqdm(cells, desc="flash cells")
    except ImportError:
        pass
    dtype = jnp.dtype(args.dtype)
    for head_dim, length, causal, mode in cells:
        batch, heads = TOKENS // length, HIDDEN // head_dim
        keys = jax.random.split(jax.random.key(length + head_dim), 3)
        shape = (batch, length, heads, head_dim)
        q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
        flops = forward_flops(batch, heads, length, length, head_dim, causal)
        flops *= 1.0 if mode == "fwd" else 3.5
        names = [n for n in args.peers if n != "xla" or length <= args.xla_max_length]
        if args.verbose:  # each peer alone, so that a failure's traceback is printed
            for name in names:
                try:
                    measure(PEERS[name], q, k, v, causal, mode, 1)
                except Exception:
                    traceback.print_exc()
        peers = {name: PEERS[name] for name in names}
        results = measure_together(peers, q, k, v, causal, mode, args.repeats)
        for name, result in results.items():
            row = dict(
                peer=name,
                head_dim=head_dim,
                length=length,
                batch=batch,
                heads=heads,
                causal=causal,
                mode=mode,
                dtype=args.dtype,
            )
            if isinstance(result, str):  # a peer that cannot run a cell: why
                row.update(error=result)
            else:
                row.update(ms=result, tflops=flops / result / 1e9)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head_dims = sorted({r["head_dim"] for r in rows})
    panels = [(h, c) for h in head_dims for c in (False, True)]
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(
        len(modes), len(panels), figsize=(3.6 * len(panels), 3.2 * len(modes)), squeeze=False
    )
    peers = sorted({r["peer"] for r in rows})
    colors = {peer: f"C{i}" for i, peer in enumerate(peers)}  # one colour per peer everywhere
    for i, mode in enumerate(modes):
        for j, (head_dim, causal) in enumerate(panels):
            ax = axes[i][j]
            for peer in peers:
                cell = [
                    r
                    for r in rows
                    if r["peer"] == peer
                    and r["mode"] == mode
                    and r["head_dim"] == head_dim
                    and r["causal"] == causal
                    and "tflops" in r
                ]
                cell.sort(key=lambda r: r["length"])
                if cell:
                    ax.plot(
                        [r["length"] for r in cell],
                        [r["tflops"] for r in cell],
                        marker="o",
                        color=colors[peer],
                        label=peer,
                    )
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode} H={head_dim} {'causal' if causal else 'non-causal'}", fontsize=9)
            ax.set_xlabel("T")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[p], marker="o", label=p) for p in peers]
    fig.legend(handles=handles, loc="upper center", ncol=len(peers), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384]
    )
    parser.add_argument(
        "--causal",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        nargs="+",
        default=[False, True],
        help="causal settings to run (true/false)",
    )
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7, help="timings per cell (median)")
    parser.add_argument(
        "--xla-max-length", type=int, default=4096, help="skip XLA above this T (it is O(T^2))"
    )
    parser.add_argument("--json", help="write device, versions and rows here")
    parser.add_argument("--plot", help="write a PNG of TFLOP/s against T here")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="measure nothing: merge the rows of these result files (runs split to fit a time "
        "limit, same device) into --json and --plot",
    )
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.load(open(path)) for path in args.merge]
        devices = {part["device"] for part in parts}
        if len(devices) != 1:
            raise SystemExit(f"refusing to merge results from different devices: {devices}")
        cells = {}  # a cell measured in two runs keeps the later file's row
        for row in (row for part in parts for row in part["rows"]):
            key = tuple(row[k] for k in ("peer", "head_dim", "length", "causal", "mode", "dtype"))
            cells[key] = row
        record = dict(parts[0], rows=list(cells.values()))
    else:
        record = dict(environment(), benchmark="flash", tokens=TOKENS, hidden=HIDDEN, rows=[])
        try:
            import tokamax

            record["tokamax"] = getattr(tokamax, "__version__", "unknown")
        except ImportError:
            record["tokamax"] = None

        def save(rows):  # after every row, so a run cut off by a time limit keeps its cells
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(record, rows=rows), f, indent=1)

        record["rows"] = run_cells(args, on_row=save)
    rows = record["rows"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
