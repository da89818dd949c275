"""What the graph models share: the GCN layer, the dense-skip attention network of Gao & Ji, and
the jit-compiled optax training loop with GAT's early stopping, used by `models.gat`,
`models.hganet` and `models.cganet`.

Training follows GAT (Velickovic et al. 2018): full-batch Adam with L2 weight decay (coupled, as
`weight_decay` in Adam), dropout on features and attention coefficients, early stopping with a
patience on the validation loss *and* accuracy (stop when neither improved for `patience` epochs),
reporting the test accuracy of the last epoch where both were at their best.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from flax import nnx

from jattn import graph as graph_ops
from models.planetoid import DATA_DIR_ENV, DATASETS, SOURCE, Planetoid, load_planetoid

try:  # progress bars are optional (the [bench] extra)
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


class SparseFeatures(NamedTuple):
    """A sparse `[N, F]` feature matrix as coordinates (Planetoid's bag-of-words rows are ~1%
    dense, so `X @ W` as a gather + segment sum is ~50x less work than the dense matmul)."""

    rows: jax.Array  # [nnz] int32
    cols: jax.Array  # [nnz] int32
    values: jax.Array  # [nnz] float32
    num_rows: int

    @classmethod
    def from_dense(cls, x: np.ndarray) -> "SparseFeatures":
        rows, cols = np.nonzero(x)
        return cls(
            jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32),
            jnp.asarray(x[rows, cols], jnp.float32), int(x.shape[0]),
        )  # fmt: skip

    def dropout(self, layer: nnx.Dropout) -> "SparseFeatures":
        """Dropout on the stored entries (dropping a zero changes nothing)."""
        return self._replace(values=layer(self.values))

    def matmul(self, kernel: jax.Array) -> jax.Array:  # [F, D] -> [N, D]
        products = self.values[:, None] * kernel[self.cols]
        return jax.ops.segment_sum(products, self.rows, self.num_rows, indices_are_sorted=True)


def project(x: "jax.Array | SparseFeatures", kernel: jax.Array) -> jax.Array:
    return x.matmul(kernel) if isinstance(x, SparseFeatures) else x @ kernel


def dropout(x: "jax.Array | SparseFeatures", layer: nnx.Dropout):
    return x.dropout(layer) if isinstance(x, SparseFeatures) else layer(x)


class GCN(nnx.Module):
    """Kipf & Welling's layer: `D^-1/2 (A + I) D^-1/2 X W` (+ bias), on a `GraphsTuple` whose
    edges already include the self-loops (the normalisation is computed from them)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.xavier_uniform()
        self.linear = nnx.Linear(in_features, out_features, kernel_init=init, rngs=rngs)

    def __call__(self, graph: jraph.GraphsTuple, x=None) -> jraph.GraphsTuple:
        """`x`: the input features (dense or `SparseFeatures`); None means `graph.nodes`."""
        h = project(graph.nodes if x is None else x, self.linear.kernel[...])
        n = h.shape[0]
        degree = jax.ops.segment_sum(jnp.ones_like(graph.receivers, h.dtype), graph.receivers, n)
        inv_sqrt = jnp.where(degree > 0, jax.lax.rsqrt(jnp.maximum(degree, 1.0)), 0.0)
        coef = inv_sqrt[graph.senders] * inv_sqrt[graph.receivers]
        out = jax.ops.segment_sum(coef[:, None] * h[graph.senders], graph.receivers, n)
        return graph._replace(nodes=out + self.linear.bias[...][None])


class DenseAttentionNet(nnx.Module):
    """GANet skeleton (Gao & Ji 2019, Fig. 2): a GCN layer maps the input to `hidden` features,
    then `num_modules` graph attention modules, each fed the concatenation of the GCN output and
    every earlier module's output (dense skip connections), then a GCN layer to the classes.
    `make_attention(in_features, rngs)` builds one module's attention layer and returns it with
    its output width. `input_dropout` (default: `dropout`) is the rate on the input features,
    `dropout` the rate on every hidden concatenation. skip="add": each module's output is added
    to the GCN output and the earlier modules' (a residual stream of `hidden` features; every
    module must output `hidden`) instead of concatenated with them: an unconfirmed reading of
    the paper's skip connections, against the dense concatenation of its figure's caption."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        make_attention: Callable[[int, nnx.Rngs], tuple[nnx.Module, int]],
        *,
        hidden: int,
        num_modules: int,
        dropout: float,
        input_dropout: float | None = None,
        skip: str = "concat",
        rngs: nnx.Rngs,
    ):
        if skip not in ("concat", "add"):
            raise ValueError(f"skip must be 'concat' or 'add', got {skip!r}")
        self.skip = skip
        self.gcn_in = GCN(in_features, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        # The same layer when the rates agree (keeps the default's random streams unchanged).
        self.input_dropout = (
            self.dropout
            if input_dropout is None or input_dropout == dropout
            else nnx.Dropout(input_dropout, rngs=rngs)
        )
        width, modules = hidden, []
        for _ in range(num_modules):
            layer, out = make_attention(width, rngs)
            modules.append(layer)
            if skip == "add" and out != hidden:
                raise ValueError(f"skip='add' needs modules of {hidden} features, got {out}")
            width += out if skip == "concat" else 0
        self.blocks = nnx.List(modules) if hasattr(nnx, "List") else modules
        self.gcn_out = GCN(width, num_classes, rngs=rngs)

    def __call__(self, graph: jraph.GraphsTuple, inputs, layout=None) -> jax.Array:
        """`graph` with self-loops; `inputs` the node features (dense or sparse): logits."""
        features = [jax.nn.elu(self.gcn_in(graph, dropout(inputs, self.input_dropout)).nodes)]
        for module in self.blocks:
            inputs = self.dropout(jnp.concatenate(features, axis=-1))
            out = _call_attention(module, graph._replace(nodes=inputs), layout)
            if self.skip == "add":  # [N, hidden]: one residual stream
                features = [features[0] + jax.nn.elu(out.nodes)]
            else:
                features.append(jax.nn.elu(out.nodes))
        x = self.dropout(jnp.concatenate(features, axis=-1))
        return self.gcn_out(graph._replace(nodes=x)).nodes


def _call_attention(module, graph, layout):
    if isinstance(module, nnx.Module) and hasattr(module, "num_heads"):
        return module(graph, layout=layout)
    return module(graph)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its example commands keep their lines); every option's
    default after its help, unless it has none (None: the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if action.option_strings and shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parser(description: str, defaults: dict, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags every graph script shares (`defaults`: the script's lr, dropout, ...)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="cora", help="Planetoid dataset")
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"folder with the ind.<dataset>.* split files (from {SOURCE}; default: "
        f"${DATA_DIR_ENV}, else ./data/planetoid)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and dropout")
    p.add_argument(
        "--epochs", type=int, default=defaults.get("epochs", 1000), help="epochs at most"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=defaults.get("patience", 100),
        help="stop after this many epochs without a better validation loss or accuracy",
    )
    p.add_argument("--lr", type=float, default=defaults.get("lr", 0.005), help="Adam step size")
    notes = defaults.get("notes", {})  # what a None default means, per flag
    p.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.get("weight_decay", 5e-4),
        help="L2 penalty added to the gradients (Adam's coupled weight decay)"
        + (f" (default: {notes['weight_decay']})" if "weight_decay" in notes else ""),
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=defaults.get("dropout", 0.6),
        help="dropout rate on the features"
        + (f" (default: {notes['dropout']})" if "dropout" in notes else ""),
    )
    p.add_argument(
        "--implementation",
        choices=("fused", "xla"),
        default=None,
        help="graph attention path (default: fused on a GPU, xla elsewhere)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def with_self_loops(data: Planetoid) -> tuple[jraph.GraphsTuple, graph_ops.EdgeLayout]:
    graph = jax.tree.map(jnp.asarray, data.graph)
    graph = graph_ops.add_self_loops(graph)
    return graph, graph_ops.edge_layout(graph)


def train(
    model: nnx.Module,
    data: Planetoid,
    args: argparse.Namespace,
    *,
    graph: jraph.GraphsTuple,
    layout: graph_ops.EdgeLayout | None,
) -> dict:
    """Full-batch training with early stopping; returns the metrics dict the scripts print."""
    labels = jnp.asarray(np.maximum(data.labels, 0))
    masks = {k: jnp.asarray(getattr(data, f"{k}_mask")) for k in ("train", "val", "test")}
    tx = optax.chain(optax.add_decayed_weights(args.weight_decay), optax.adam(args.lr))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    inputs = SparseFeatures.from_dense(np.asarray(data.graph.nodes))
    # The graph only carries topology inside the loop (nodes: a [N, 0] placeholder).
    graph = graph._replace(nodes=jnp.zeros((inputs.num_rows, 0), jnp.float32))

    def loss_and_accuracy(logits, mask):
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, -1) == labels
        count = jnp.sum(mask)
        return jnp.sum(losses * mask) / count, jnp.sum(correct * mask) / count

    # Functional NNX (split/merge around jax.jit): less per-step overhead than nnx.jit. Train and
    # eval modes differ in static attributes (dropout's `deterministic`): one graphdef each.
    model.train()
    train_def, state = nnx.split((model, optimizer))
    model.eval()
    eval_def, _ = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state):
        model, optimizer = nnx.merge(train_def, state)

        def loss_fn(model):
            return loss_and_accuracy(model(graph, inputs, layout), masks["train"])[0]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    @jax.jit
    def evaluate(state):
        model, _ = nnx.merge(eval_def, state)
        logits = model(graph, inputs, layout)
        return {k: loss_and_accuracy(logits, m) for k, m in masks.items()}

    start = time.perf_counter()
    best_acc, best_loss, patience_left = -1.0, np.inf, args.patience
    best = dict(val_accuracy=0.0, val_loss=np.inf, test_accuracy=0.0, best_epoch=0)
    epochs = range(1, args.epochs + 1)
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm(epochs, desc=f"{data.name}", file=sys.stderr, leave=False)
        epochs = bar
    epoch = 0
    for epoch in epochs:
        state, train_loss = train_step(state)
        metrics = jax.device_get(evaluate(state))
        train_loss = float(train_loss)
        val_loss, val_acc = (float(v) for v in metrics["val"])
        if val_acc >= best_acc or val_loss <= best_loss:
            if val_acc >= best_acc and val_loss <= best_loss:
                best = dict(
                    val_accuracy=val_acc,
                    val_loss=val_loss,
                    test_accuracy=float(metrics["test"][1]),
                    best_epoch=epoch,
                )
            best_acc, best_loss = max(val_acc, best_acc), min(val_loss, best_loss)
            patience_left = args.patience
        else:
            patience_left -= 1
            if patience_left == 0:
                break
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_acc:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    nnx.update((model, optimizer), state)
    return dict(
        dataset=data.name,
        seed=args.seed,
        test_accuracy=round(100 * best["test_accuracy"], 2),
        val_accuracy=round(100 * best["val_accuracy"], 2),
        val_loss=round(best["val_loss"], 4),
        best_epoch=best["best_epoch"],
        epochs=epoch,
        seconds=round(time.perf_counter() - start, 2),
    )


def run(
    argv: Sequence[str] | None,
    *,
    description: str,
    defaults: dict,
    add_args: Callable[[argparse.ArgumentParser], None],
    build: Callable[[argparse.Namespace, Planetoid, nnx.Rngs], nnx.Module],
    model_name: str,
) -> dict:
    """Parse `argv`, load the data, build, train; print the metrics as the last stdout line."""
    p = parser(description, defaults, prog=f"python -m models.{model_name}")
    add_args(p)
    args = p.parse_args(argv)
    try:
        data = load_planetoid(args.dataset, args.data_dir)
    except FileNotFoundError as e:
        p.error(str(e))
    rngs = nnx.Rngs(params=args.seed, dropout=args.seed + 1_000_003)
    model = build(args, data, rngs)
    graph, layout = with_self_loops(data)
    result = dict(model=model_name, **train(model, data, args, graph=graph, layout=layout))
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("data_dir", "seed")}
    print(json.dumps(result), flush=True)
    return result
