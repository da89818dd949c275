"""Graph attention layers side by side: jattn's fused GAO vs the plain XLA segment version, jraph's
GAT, and PyG's GATConv; hGAO and cGAO; memory of cGAO vs GAO on growing graphs.

    python -m benchmarks.graph --out benchmarks/results/graph_h100.json

Layer: 64 input features -> 8 heads x 8 (a GAT layer), random graph (uniform senders and
receivers), float32. Times are medians of repeated runs after warm-up (`jattn.demo.median_ms`):
forward, and forward+backward (gradients of `sum(out * cotangent)` with respect to the node
features and every parameter). Memory is XLA's compiled estimate (arguments + outputs + temporaries
of the jitted function, `memory_analysis()`); PyG's is `torch.cuda.max_memory_allocated` around
the call, measured in a separate process (so neither framework holds the other's memory).
`fused` has the edge layout (`jattn.graph.edge_layout`: row-split neighbour tables, rows of 8
slots) computed once per graph, outside the timed call, as a training loop over a fixed graph
would; `fused/4` and `fused/16` use rows of 4 and 16 slots; `fused+layout` builds the layout
inside the timed call; `fused_scatter` is the edge-space custom_vjp (plain scatters).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from jattn import graph as jg
from jattn.demo import environment, median_ms

IN_FEATURES, HEADS, HEAD_FEATURES = 64, 8, 8


def random_graph(num_nodes: int, num_edges: int, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (num_nodes, IN_FEATURES), jnp.float32)
    senders = jax.random.randint(k[1], (num_edges,), 0, num_nodes, jnp.int32)
    receivers = jax.random.randint(k[2], (num_edges,), 0, num_nodes, jnp.int32)
    graph = jraph.GraphsTuple(
        nodes=x, edges=None, globals=None, senders=senders, receivers=receivers,
        n_node=jnp.array([num_nodes]), n_edge=jnp.array([num_edges]),
    )  # fmt: skip
    return graph


def params(seed: int = 1):
    k = jax.random.split(jax.random.key(seed), 4)
    return dict(
        w=jax.random.normal(k[0], (IN_FEATURES, HEADS * HEAD_FEATURES)) / IN_FEATURES**0.5,
        a_s=jax.random.normal(k[1], (HEADS, HEAD_FEATURES)) * 0.3,
        a_r=jax.random.normal(k[2], (HEADS, HEAD_FEATURES)) * 0.3,
        p=jax.random.normal(k[3], (IN_FEATURES,)),
    )


def layer_fn(kind: str):
    """(x, params, graph, layout) -> [N, HEADS, HEAD_FEATURES] for one implementation. The graph
    and layout are arguments (not closure constants XLA would fold into the program)."""

    def project(x, prm):
        return (x @ prm["w"]).reshape(x.shape[0], HEADS, HEAD_FEATURES)

    def gao(implementation, own_layout):
        def f(x, prm, graph, layout):
            g = graph._replace(nodes=project(x, prm))
            return jg.graph_attention(
                g, prm["a_s"], prm["a_r"], implementation=implementation,
                layout=jg.edge_layout(graph) if own_layout else layout,
            ).nodes  # fmt: skip

        return f

    if kind == "fused" or kind.startswith("fused/"):  # fused/D: the layout's row width D
        return gao("fused", False)
    if kind == "fused+layout":
        return gao("fused", True)
    if kind == "fused_scatter":
        return gao("fused_scatter", False)
    if kind == "xla":
        return gao("xla", False)
    if kind == "jraph.GAT":

        def f(x, prm, graph, layout):
            def logit_fn(s, r, e):
                del e
                s = jnp.sum(s * prm["a_s"], -1)
                r = jnp.sum(r * prm["a_r"], -1)
                return jax.nn.leaky_relu(s + r, 0.2)[..., None]  # [E, H, 1]

            gat = jraph.GAT(lambda n: n, logit_fn, node_update_fn=lambda n: n)
            return gat(graph._replace(nodes=project(x, prm))).nodes

        return f
    if kind.startswith("hgao"):
        implementation = kind.split("-")[1]

        def f(x, prm, graph, layout):
            return jg.hard_graph_attention(
                graph._replace(nodes=x), prm["p"], k=8, values=project(x, prm),
                implementation=implementation,
                layout=layout if implementation == "fused" else None,
            ).nodes  # fmt: skip

        return f
    if kind == "cgao":

        def f(x, prm, graph, layout):
            v = project(x, prm)
            return jg.channel_graph_attention(graph._replace(nodes=v), normalize=True).nodes

        return f
    raise ValueError(kind)


def measure(kind: str, graph, layout, repeats: int, time_it: bool = True) -> dict:
    prm = params()
    x = graph.nodes
    f = layer_fn(kind)
    out_shape = jax.eval_shape(f, x, prm, graph, layout)
    cot = jax.random.normal(jax.random.key(7), out_shape.shape, jnp.float32)
    fwd = jax.jit(f)
    fwd_bwd = jax.jit(
        jax.grad(lambda x, prm, g, lay, cot: jnp.sum(f(x, prm, g, lay) * cot), argnums=(0, 1))
    )
    args = dict(forward=(x, prm, graph, layout), forward_backward=(x, prm, graph, layout, cot))
    row = dict(implementation=kind)
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
        try:
            compiled = fn.lower(*args[name]).compile()
            mem = compiled.memory_analysis()
            if mem is not None:
                row[f"{name}_memory_mb"] = round(
                    (mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes)
                    / 2**20,
                    1,
                )
            if time_it:
                call = lambda fn=compiled, a=args[name]: fn(*a)  # noqa: E731
                row[f"{name}_ms"] = round(median_ms(call, repeats), 3)
        except Exception as e:  # noqa: BLE001  (recorded, not fatal: one size may not fit)
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


PYG_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time
    import torch
    from torch_geometric.nn import GATConv
    num_nodes, num_edges, repeats = (int(a) for a in sys.argv[1:4])
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(num_nodes, 64, device=dev, generator=g, requires_grad=True)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), device=dev, generator=g)
    conv = GATConv(64, 8, heads=8, add_self_loops=False).to(dev)
    cot = torch.randn(num_nodes, 64, device=dev, generator=g)
    def med(fn):
        fn(); torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    def fwd():
        with torch.no_grad():
            return conv(x, edge_index)
    def fwd_bwd():
        conv.zero_grad(); x.grad = None
        (conv(x, edge_index) * cot).sum().backward()
    row = {"implementation": "pyg.GATConv"}
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        row[name + "_ms"] = round(med(fn), 3)
        row[name + "_memory_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    import torch_geometric
    row["versions"] = {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__}
    print(json.dumps(row))
    """
)


def measure_pyg(num_nodes: int, num_edges: int, repeats: int) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PYG_SCRIPT, str(num_nodes), str(num_edges), str(repeats)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if proc.returncode:
            return dict(implementation="pyg.GATConv", error=proc.stderr.strip()[-400:])
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return dict(implementation="pyg.GATConv", error=f"{type(e).__name__}: {e}")


def plot(record: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, size in zip(axes[:2], record["speed"], strict=False):
        rows = [r for r in size["rows"] if "forward_backward_ms" in r]
        names = [r["implementation"] for r in rows]
        pos = np.arange(len(rows))
        ax.bar(pos - 0.2, [r.get("forward_ms", 0) for r in rows], 0.4, label="forward")
        ax.bar(pos + 0.2, [r["forward_backward_ms"] for r in rows], 0.4, label="fwd+bwd")
        ax.set_xticks(pos, names, rotation=30, ha="right")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"GAT layer 8x8 heads, {size['num_edges']:,} edges")
        ax.set_yscale("log")
        ax.legend()
    ax = axes[2]
    for kind in ("fused", "xla", "cgao"):
        pts = [
            (m["num_edges"], r.get("forward_backward_memory_mb"))
            for m in record["memory"]
            for r in m["rows"]
            if r["implementation"] == kind and r.get("forward_backward_memory_mb")
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"edges ({record['memory_nodes']:,} nodes)")
    ax.set_ylabel("fwd+bwd memory, MiB (XLA estimate)")
    ax.set_title("cGAO vs GAO memory on growing graphs")
    ax.legend()
    fig.suptitle(f"{record['device']}, jax {record['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(record: dict, path: str) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edges", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--degree", type=int, default=10, help="nodes = edges / degree")
    p.add_argument("--memory-edges", type=int, nargs="+",
                   default=[100_000, 1_000_000, 4_000_000, 16_000_000])  # fmt: skip
    p.add_argument("--memory-nodes", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-pyg", action="store_true")
    p.add_argument("--kinds", nargs="+", default=None, help="implementations to time")
    p.add_argument("--out", default="benchmarks/results/graph.json")
    args = p.parse_args(argv)
    kinds = ["fused", "fused/4", "fused/16", "fused+layout", "fused_scatter", "xla", "jraph.GAT"]
    kinds += ["hgao-fused", "hgao-xla"]
    kinds = args.kinds or kinds + ["cgao"]
    record = dict(environment(), layer=dict(
        in_features=IN_FEATURES, heads=HEADS, head_features=HEAD_FEATURES, dtype="float32"),
        speed=[], memory=[], memory_nodes=args.memory_nodes)  # fmt: skip
    for num_edges in args.edges:
        num_nodes = num_edges // args.degree
        graph = random_graph(num_nodes, num_edges)
        layout = jax.block_until_ready(jg.edge_layout(graph))
        rows = []
        for kind in kinds:
            lay = layout
            if kind.startswith("fused/"):
                lay = jg.edge_layout(graph, row_width=int(kind.split("/")[1]))
            rows.append(measure(kind, graph, lay, args.repeats))
            print(num_edges, json.dumps(rows[-1]), flush=True)
        if not args.no_pyg:
            rows.append(measure_pyg(num_nodes, num_edges, args.repeats))
            print(num_edges, json.dumps(rows[-1]), flush=True)
        record["speed"].append(dict(num_nodes=num_nodes, num_edges=num_edges, rows=rows))
        save(record, args.out)  # after every size: a run cut short keeps what it measured
        del graph, layout
    for num_edges in args.memory_edges:
        graph = random_graph(args.memory_nodes, num_edges)
        layout = jg.edge_layout(graph)
        rows = [measure(k, graph, layout, 0, time_it=False) for k in ("fused", "xla", "cgao")]
        print("memory", num_edges, json.dumps(rows), flush=True)
        record["memory"].append(dict(num_edges=num_edges, rows=rows))
        save(record, args.out)
    out = pathlib.Path(args.out)
    try:
        plot(record, out.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {e}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
