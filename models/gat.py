"""GAT (Velickovic et al., ICLR 2018) on Planetoid, built from `jattn.nn.GraphAttention`.

The paper's transductive model: dropout 0.6 -> GAT layer (8 heads x 8 features, ELU, heads
concatenated) -> dropout 0.6 -> GAT layer (1 head, the class logits); attention dropout 0.6 in
both layers; self-loops; Adam lr 0.005, L2 5e-4, early stopping with patience 100.

    python -m models.gat --dataset cora --seed 0

The last stdout line is JSON: test_accuracy, val_accuracy, epochs, seconds, ...
"""

import argparse
from collections.abc import Sequence

import jax
import jraph
from flax import nnx

from jattn.nn import GraphAttention
from models.graph_training import dropout, project, run
from models.planetoid import Planetoid

DEFAULTS = dict(lr=0.005, weight_decay=5e-4, dropout=0.6, patience=100, epochs=1000)


class GAT(nnx.Module):
    def __init__(self, in_features, num_classes, *, hidden=8, heads=8, out_heads=1, dropout=0.6,
                 attention_dropout=0.6, value_dropout=True, score="additive",
                 implementation=None, rngs):  # fmt: skip
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.value_dropout = value_dropout
        common = dict(
            score=score, attention_dropout=attention_dropout, implementation=implementation,
            rngs=rngs,
        )  # fmt: skip
        self.hidden = GraphAttention(in_features, hidden, heads, **common)
        self.out = GraphAttention(heads * hidden, num_classes, out_heads, concat=False, **common)

    def __call__(self, graph: jraph.GraphsTuple, inputs, layout=None) -> jax.Array:
        """`graph` with self-loops, `inputs` the node features (dense or `SparseFeatures`, whose
        projection is a sparse matmul with the first layer's kernel): the logits [N, classes]."""
        x = project(dropout(inputs, self.dropout), self.hidden.linear.kernel[...])
        x = jax.nn.elu(self.hidden(self._values(graph, x), layout=layout, projected=True).nodes)
        x = self.dropout(x) @ self.out.linear.kernel[...]
        return self.out(self._values(graph, x), layout=layout, projected=True).nodes

    def _values(self, graph, values):
        # The reference GAT code also drops the projected features before aggregation.
        return graph._replace(nodes=self.dropout(values) if self.value_dropout else values)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=8, help="features per head")
    p.add_argument("--heads", type=int, default=8, help="attention heads of the hidden layer")
    p.add_argument(
        "--attention-dropout", type=float, default=0.6, help="dropout on attention coefficients"
    )
    p.add_argument(
        "--score", choices=("additive", "dot"), default="additive",
        help="attention score: GAT's additive one or a scaled dot product",
    )  # fmt: skip
    p.add_argument(
        "--no-value-dropout", action="store_true",
        help="no dropout on the projected features (PyG's GATConv has none; GAT's code has it)",
    )  # fmt: skip


def build(args: argparse.Namespace, data: Planetoid, rngs: nnx.Rngs) -> GAT:
    return GAT(
        data.num_features, data.num_classes, hidden=args.hidden, heads=args.heads,
        dropout=args.dropout, attention_dropout=args.attention_dropout, score=args.score,
        value_dropout=not args.no_value_dropout,
        implementation=args.implementation, rngs=rngs,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    return run(
        argv, description=__doc__, defaults=DEFAULTS, add_args=add_args,
        build=build, model_name="gat",
    )  # fmt: skip


if __name__ == "__main__":
    main()
