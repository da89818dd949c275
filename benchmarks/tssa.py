"""TSSA side by side: jattn's fused kernels vs the XLA-compiled reference, the official PyTorch
ToST operator, and flash attention (cuDNN, jattn) at the same shape, T from 1k to 256k.

Shape: B = max(1, 32768 // T), N=8 heads x H=64 (ToST-S/M's heads), bfloat16. Time is the
median after warm-up (JAX: of 10 calls queued back to back, per call);
bandwidth counts the minimum traffic: one read of w and one write of y (forward), plus one read
of w and dy and one write of dw (backward); memory is XLA's compiled footprint (arguments,
outputs and temporaries) for JAX and `torch.cuda.max_memory_allocated` for PyTorch.

The PyTorch peer is a line-by-line transcription of the official modules' forward
(`tost_vision/tost.py` AttentionTSSA, `tost_lang/model_TSSA.py` CausalSelfAttention_TSSA; see
`../shared/reference/tssa_and_graph_attention.md`) from the projected tokens on: the rearranges
and the operator, without the two Linear layers (which every implementation shares).

Run: python -m benchmarks.tssa --out benchmarks/results/tssa_h100.json (a GPU; the plot goes
beside the JSON).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jattn
from jattn.demo import environment, median_ms
from pallas_kernels import tssa as tssa_kernels

HEADS, HEAD_DIM = 8, 64
LENGTHS = (4096, 16384, 65536, 262144, 1048576)
BATCH_TOKENS = 32768  # B = max(1, BATCH_TOKENS // T): B * T >= 32k tokens
FLASH_BUDGET_MS = 2000.0  # stop timing a quadratic peer at longer T once one call takes this


def _repeats(ms_guess: float) -> int:
    return 20 if ms_guess < 5 else (5 if ms_guess < 100 else 2)


def batch_for(length: int) -> int:
    """Batch elements at length T: B * T >= BATCH_TOKENS, so short sequences fill the GPU."""
    return max(1, BATCH_TOKENS // length)


def _time(fn, *args) -> float:
    """Median ms of one call; each sample queues several calls back to back, so the host's
    dispatch latency (~0.1 ms a call) does not pose as device time at small T."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))  # compile + first call
    first = (time.perf_counter() - start) * 1e3
    inner = 10 if first < 50 else 1

    def run():
        out = None
        for _ in range(inner):
            out = fn(*args)
        return out

    return median_ms(run, _repeats(first)) / inner


def copy_bandwidth(num_bytes: int) -> float:
    """GB/s of a device copy (read + write) of an array this big: the roofline for TSSA."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x * 2.0)
    ms = _time(copy, x)
    return 2 * x.nbytes / ms / 1e6


def tssa_functions(causal: bool, length: int):
    temperature = jnp.linspace(0.5, 1.5, HEADS, dtype=jnp.float32)
    bias = 0.01 * jnp.ones((HEADS, length), jnp.float32) if causal else None

    def op(implementation, config=None):
        def f(w):
            return jattn.token_statistics_attention(
                w,
                temperature,
                causal=causal,
                denom_bias=bias,
                implementation=implementation,
                config=config,
            )

        def f_bwd(w, dy):  # a training step's share: y and dw (y is used, as in training)
            y, vjp = jax.vjp(f, w)
            return y, vjp(dy)[0]

        return jax.jit(f), jax.jit(f_bwd)

    return op


def _compiled(fn, *args):
    """(compiled fn, its XLA memory footprint: arguments + outputs + temporaries, or None)."""
    compiled = fn.lower(*args).compile()
    try:
        stats = compiled.memory_analysis()
        memory = int(
            stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        )
    except Exception:  # noqa: BLE001  (not every backend reports it)
        memory = None
    return compiled, memory


def measure_jax(rows, name, variant, length, fwd, fwd_bwd, w, dy, nbytes):
    for pass_, fn, args, traffic in (("fwd", fwd, (w,), 2), ("fwd+bwd", fwd_bwd, (w, dy), 5)):
        compiled, memory = _compiled(fn, *args)
        ms = _time(compiled, *args)
        rows.append(
            dict(
                method=name,
                variant=variant,
                T=length,
                B=w.shape[0],
                pass_=pass_,
                ms=ms,
                gbps=traffic * nbytes / ms / 1e6,
                memory_bytes=memory,
            )
        )


def flash_rows(rows, length, w, skip):
    """Flash attention with q = k = v = w: cuDNN (jax.nn) and jattn's auto choice."""
    peers = {
        "flash cudnn (jax.nn)": lambda q: jax.nn.dot_product_attention(
            q, q, q, implementation="cudnn"
        ),
        "flash jattn (auto)": lambda q: jattn.dot_product_attention(q, q, q),
    }
    for name, fn in peers.items():
        if name in skip:
            continue
        try:
            fwd, memory = _compiled(jax.jit(fn), w)
            ms = _time(fwd, w)
        except Exception as err:  # noqa: BLE001  (record why a peer could not run)
            rows.append(dict(method=name, variant="non-causal", T=length, error=repr(err)[:300]))
            skip.add(name)
            continue
        flops = 4 * w.shape[0] * HEADS * length * length * HEAD_DIM
        rows.append(
            dict(
                method=name,
                variant="non-causal",
                T=length,
                pass_="fwd",
                ms=ms,
                tflops=flops / ms / 1e9,
                memory_bytes=memory,
            )
        )
        if ms > FLASH_BUDGET_MS / 16:  # the next T (4x) would take 16x as long
            skip.add(name)


# --- the official PyTorch operator, transcribed ---------------------------------------------


def torch_rows(rows, lengths, dtype_name):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    dev = torch.device("cuda")
    dtype = dict(bfloat16=torch.bfloat16, float32=torch.float32)[dtype_name]

    def vision(x, temp):  # x: [B, T, C], the output of the qkv Linear
        w = x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).permute(0, 2, 1, 3)  # b h n d
        w_normed = F.normalize(w, dim=-2)
        w_sq = w_normed**2
        pi = torch.softmax(torch.sum(w_sq, dim=-1) * temp, dim=1)  # temp [h, 1]
        dots = torch.matmul((pi / (pi.sum(dim=-1, keepdim=True) + 1e-8)).unsqueeze(-2), w**2)
        attn = 1.0 / (1 + dots)
        out = -torch.mul(w.mul(pi.unsqueeze(-1)), attn)
        return out.permute(0, 2, 1, 3).reshape(x.shape)  # 'b h n d -> b n (h d)'

    def causal(x, temp, denom_bias):
        b, t, c = x.shape
        w = x.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        w_sq = w**2
        denom = torch.cumsum(w_sq, dim=-2).clamp_min(1e-12)
        w_normed = (w_sq / denom) + denom_bias[:, :t, :]
        pi = F.softmax(torch.sum(w_normed, dim=-1) * temp, dim=1)
        dots = torch.cumsum(w_sq * pi.unsqueeze(-1), dim=-2) / (pi.cumsum(dim=-1) + 1e-8).unsqueeze(
            -1
        )
        attn = 1.0 / (1 + dots)
        y = -torch.mul(w.mul(pi.unsqueeze(-1)), attn)
        return y.transpose(1, 2).contiguous().view(b, t, c)

    def bench(fn):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))

    temp = torch.ones(HEADS, 1, device=dev, dtype=dtype, requires_grad=True)
    for length in tqdm(lengths, desc="torch"):
        x = torch.randn(
            batch_for(length), length, HEADS * HEAD_DIM, device=dev, dtype=dtype, requires_grad=True
        )
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        bias = torch.zeros(HEADS, length, 1, device=dev, dtype=dtype, requires_grad=True)
        for variant, fn in (
            ("non-causal", lambda x=x: vision(x, temp)),
            ("causal", lambda x=x, bias=bias: causal(x, temp, bias)),
        ):
            for pass_ in ("fwd", "fwd+bwd"):
                if pass_ == "fwd":

                    def run(fn=fn):
                        with torch.no_grad():
                            return fn()
                else:

                    def run(fn=fn, dy=dy):
                        fn().backward(dy)

                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                try:
                    ms = bench(run)
                except RuntimeError as err:  # out of memory
                    rows.append(
                        dict(
                            method="official PyTorch",
                            variant=variant,
                            T=length,
                            pass_=pass_,
                            error=str(err)[:200],
                        )
                    )
                    continue
                traffic = 2 if pass_ == "fwd" else 5
                rows.append(
                    dict(
                        method="official PyTorch",
                        variant=variant,
                        T=length,
                        pass_=pass_,
                        ms=ms,
                        gbps=traffic * nbytes / ms / 1e6,
                        memory_bytes=int(torch.cuda.max_memory_allocated() - base + nbytes),
                    )
                )
                x.grad = None
        del x, dy, bias
    torch.cuda.empty_cache()


def tile_sweep(rows, length, dtype):
    """A few kernel configs at one length (forward and fwd+bwd), to pick the defaults."""
    key = jax.random.key(1)
    w = jax.random.normal(key, (1, length, HEADS, HEAD_DIM), dtype)
    configs = [
        tssa_kernels.Config(block_t=8, num_warps=4),
        tssa_kernels.Config(block_t=16, num_warps=4),
        tssa_kernels.Config(block_t=16, num_warps=8),
        tssa_kernels.Config(block_t=32, num_warps=8),
        tssa_kernels.Config(block_t=16, num_warps=8, reverse_middle_pass=False),
        tssa_kernels.Config(block_t=16, chunk_t=64, num_warps=8),
        tssa_kernels.Config(block_t=16, chunk_t=1024, num_warps=8),
        tssa_kernels.Config(block_t=8, chunk_t=256, single_pass=True),  # causal: one launch
        tssa_kernels.Config(block_t=8, store_pi=True),  # Pi through memory (not yet timed)
        tssa_kernels.Config(block_t=16, num_warps=8, store_pi=True),
    ]
    for causal in (False, True):
        op = tssa_functions(causal, length)
        for config in tqdm(configs, desc=f"sweep causal={causal}"):
            fwd, fwd_bwd = op("triton", config)
            try:
                ms = _time(fwd, w)
                ms_b = _time(fwd_bwd, w, w)
            except Exception as err:  # noqa: BLE001
                rows.append(dict(config=repr(config), causal=causal, error=repr(err)[:300]))
                continue
            rows.append(
                dict(
                    config=repr(config),
                    causal=causal,
                    T=length,
                    fwd_ms=ms,
                    fwd_bwd_ms=ms_b,
                    fwd_gbps=2 * w.nbytes / ms / 1e6,
                )
            )


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in record["rows"] if "ms" in r})
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        series = {}
        for row in record["rows"]:
            if row.get("pass_") == pass_ and "ms" in row:
                series.setdefault((row["method"], row["variant"]), []).append((row["T"], row["ms"]))
        for (method, variant), points in sorted(series.items()):
            points.sort()
            ax.plot(
                *zip(*points, strict=True),
                "--" if variant == "causal" else "-",
                marker="o",
                markersize=3,
                color=colors[method],
                label=f"{method} ({variant})",
            )
        # slope guides through the longest point of the first series
        (t0, ms0) = max(next(iter(sorted(series.items())))[1])
        lengths = np.array(sorted({t for pts in series.values() for t, _ in pts}), float)
        ax.plot(lengths, ms0 * lengths / t0, ":", color="gray", label="∝ T")
        ax.plot(lengths, ms0 * 100 * (lengths / t0) ** 2, ":", color="black", label="∝ T²")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"TSSA {pass_}, B=1, {HEADS}x{HEAD_DIM} heads, {record['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{record['device']}, jax {record['jax']}, {record['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/tssa.json")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS))
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-flash", action="store_true")
    parser.add_argument("--sweep-length", type=int, default=65536, help="0: no tile sweep")
    parser.add_argument("--plot-only", action="store_true", help="re-plot --out's JSON, no runs")
    args = parser.parse_args(argv)
    if args.plot_only:
        record = json.loads(pathlib.Path(args.out).read_text())
        plot(record, pathlib.Path(args.out).with_suffix(".png"))
        print(table(record))
        return
    dtype = jnp.dtype(args.dtype)
    rows, sweep = [], []
    record = dict(
        environment(),
        dtype=args.dtype,
        heads=HEADS,
        head_dim=HEAD_DIM,
        batch=f"max(1, {BATCH_TOKENS} // T)",
        note="bandwidth counts one read of w + one write of y (fwd); + read w, dy, write dw (bwd)",
    )
    skip = set()
    for length in tqdm(args.lengths, desc="jax"):
        keys = jax.random.split(jax.random.key(0), 2)
        w = jax.random.normal(keys[0], (batch_for(length), length, HEADS, HEAD_DIM), dtype)
        dy = jax.random.normal(keys[1], w.shape, dtype)
        for causal in (False, True):
            op = tssa_functions(causal, length)
            variant = "causal" if causal else "non-causal"
            for name, implementation in (("jattn triton", "triton"), ("xla reference", "xla")):
                fwd, fwd_bwd = op(implementation)
                measure_jax(rows, name, variant, length, fwd, fwd_bwd, w, dy, w.nbytes)
        if not args.no_flash:
            flash_rows(rows, length, w, skip)
        pathlib.Path(args.out).write_text(json.dumps(dict(record, rows=rows), indent=1) + "\n")
    # after the runs, on a warm GPU (timed first, a 256 MiB copy read 1.07 TB/s on the H200)
    record["copy_gbps"] = copy_bandwidth(2**30)
    if not args.no_torch:
        torch_rows(rows, args.lengths, args.dtype)
    out = pathlib.Path(args.out)
    record.update(rows=rows, sweep=sweep)
    save(record, out)
    print(table(record))
    if args.sweep_length:
        tile_sweep(sweep, args.sweep_length, dtype)
        save(record, out)
        print(json.dumps(sweep, indent=1))


def save(record, out: pathlib.Path) -> None:
    out.write_text(json.dumps(record, indent=1) + "\n")
    try:
        plot(record, out.with_suffix(".png"))
    except ImportError as err:  # matplotlib is in the [bench] extra
        print(f"no plot: {err}")


def table(record) -> str:
    """Markdown table: ms (GB/s) per method, variant and pass, one column per T."""
    lengths = sorted({r["T"] for r in record["rows"] if "ms" in r})
    keys = []
    for r in record["rows"]:
        if "ms" in r and (r["method"], r["variant"], r["pass_"]) not in keys:
            keys.append((r["method"], r["variant"], r["pass_"]))
    lines = [
        "| method | variant | pass | " + " | ".join(f"T={t}" for t in lengths) + " |",
        "|---" * (3 + len(lengths)) + "|",
    ]
    for key in keys:
        cells = []
        for t in lengths:
            match = [
                r
                for r in record["rows"]
                if "ms" in r and (r["method"], r["variant"], r["pass_"]) == key and r["T"] == t
            ]
            if not match:
                cells.append("–")
                continue
            r = match[0]
            extra = f" ({r['gbps']:.0f} GB/s)" if "gbps" in r else ""
            cells.append(f"{r['ms']:.3g} ms{extra}")
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
    lines.append(f"\ndevice copy: {record['copy_gbps']:.0f} GB/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
