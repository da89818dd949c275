"""cGANet (Gao & Ji, KDD 2019) on Planetoid: channel-wise graph attention (cGAO) in GANet.

The GANet skeleton of `models.hganet` (GCN layer in, `--modules` attention modules with dense
skip concatenation, GCN layer out) with `jattn.nn.ChannelGraphAttention` modules: attention
between feature channels over the whole graph, no adjacency inside the modules (the GCN layers
carry the graph structure). `--normalize` uses cosine channel similarities (XCA's variant; the
paper's form is unnormalised `X^T X`).

    python -m models.cganet --dataset cora --seed 0

The last stdout line is JSON: test_accuracy, val_accuracy, epochs, seconds, ...
"""

import argparse
from collections.abc import Sequence

from flax import nnx

from jattn.nn import ChannelGraphAttention
from models.graph_training import DenseAttentionNet, run
from models.planetoid import Planetoid

DEFAULTS = dict(lr=0.005, weight_decay=5e-4, dropout=0.6, patience=100, epochs=1000)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=64, help="GCN-in width")
    p.add_argument("--modules", type=int, default=2, help="attention modules")
    p.add_argument("--features", type=int, default=64, help="channels per module")
    p.add_argument("--normalize", action="store_true", help="cosine channel similarities")
    p.add_argument(
        "--scale", type=float, default=None, help="logit scale (default: 1, the paper's)"
    )


def build(args: argparse.Namespace, data: Planetoid, rngs: nnx.Rngs) -> nnx.Module:
    def make_attention(width: int, rngs: nnx.Rngs):
        layer = ChannelGraphAttention(
            width, args.features, normalize=args.normalize, scale=args.scale, rngs=rngs
        )
        return layer, args.features

    return DenseAttentionNet(
        data.num_features, data.num_classes, make_attention, hidden=args.hidden,
        num_modules=args.modules, dropout=args.dropout, rngs=rngs,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    return run(
        argv, description=__doc__, defaults=DEFAULTS, add_args=add_args,
        build=build, model_name="cganet",
    )  # fmt: skip


if __name__ == "__main__":
    main()
