"""Flax NNX graph attention layers over `jattn.graph`: GAO, hGAO and cGAO.

Every layer maps a `jraph.GraphsTuple` with `nodes` `[N, in_features]` to the same graph with new
`nodes`; senders, receivers and padding pass through untouched. Attention dropout (GAT's dropout
on the normalised coefficients) follows `nnx.Dropout`: active after `model.train()` or with
`deterministic=False`, off after `model.eval()`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

from jattn import graph as graph_ops

_glorot = nnx.initializers.xavier_uniform()


class _HeadsOut(nnx.Module):
    """Shared pieces: the value projection to heads, attention dropout, head merge and bias."""

    def _init_heads(self, in_features, out_features, num_heads, *, concat, attention_dropout,
                    use_bias, add_self_loops, implementation, param_dtype, rngs):  # fmt: skip
        self.in_features, self.out_features, self.num_heads = in_features, out_features, num_heads
        self.concat = concat
        self.add_self_loops = add_self_loops
        self.implementation = implementation
        self.linear = nnx.Linear(
            in_features, num_heads * out_features, use_bias=False, kernel_init=_glorot,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.attention_dropout = nnx.Dropout(attention_dropout, rngs=rngs)
        width = num_heads * out_features if concat else out_features
        self.bias = nnx.Param(jnp.zeros((width,), param_dtype)) if use_bias else None

    def _prepare(self, graph: jraph.GraphsTuple, deterministic: bool | None, projected: bool):
        nodes = graph.nodes
        width = self.num_heads * self.out_features if projected else self.in_features
        if nodes.ndim != 2 or nodes.shape[1] != width:
            raise ValueError(
                f"{type(self).__name__} expects nodes [N, {width}] (projected={projected}), "
                f"got {nodes.shape}"
            )
        inner = graph_ops.add_self_loops(graph) if self.add_self_loops else graph
        values = nodes if projected else self.linear(nodes)
        values = values.reshape(nodes.shape[0], self.num_heads, self.out_features)
        weights = None
        if self.attention_dropout.rate > 0:
            ones = jnp.ones((inner.senders.shape[0], self.num_heads), values.dtype)
            weights = self.attention_dropout(ones, deterministic=deterministic)
            if weights is ones:  # deterministic: no mask
                weights = None
        return inner, values, weights

    def _merge(self, graph: jraph.GraphsTuple, out: jax.Array) -> jraph.GraphsTuple:
        out = out.reshape(out.shape[0], -1) if self.concat else jnp.mean(out, axis=1)
        if self.bias is not None:
            out = out + self.bias[...][None]
        return graph._replace(nodes=out)


class GraphAttention(_HeadsOut):
    """GAO / GAT layer: multi-head attention of every node over its incoming edges.

    `score="additive"` is GAT (LeakyReLU of `<a_s, Wh_j> + <a_r, Wh_i>`); `score="dot"` is the
    paper's dot-product `attn` (scale 1 unless `scale` is given). Heads are concatenated
    (`concat=True`, output `[N, num_heads * out_features]`) or averaged (`[N, out_features]`).
    `add_self_loops=True` lets every node attend to itself (GAT's convention).

    Example:
      >>> import jraph, jax.numpy as jnp
      >>> g = jraph.GraphsTuple(nodes=jnp.ones((4, 16)), edges=None, globals=None,
      ...     senders=jnp.array([0, 1, 2, 3]), receivers=jnp.array([1, 2, 3, 0]),
      ...     n_node=jnp.array([4]), n_edge=jnp.array([4]))
      >>> layer = GraphAttention(16, 8, num_heads=4, add_self_loops=True, rngs=nnx.Rngs(0))
      >>> layer(g).nodes.shape
      (4, 32)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_heads: int = 1,
        *,
        score: str = "additive",
        concat: bool = True,
        negative_slope: float = 0.2,
        scale: float | None = None,
        attention_dropout: float = 0.0,
        use_bias: bool = True,
        add_self_loops: bool = False,
        implementation: str | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._init_heads(
            in_features, out_features, num_heads, concat=concat,
            attention_dropout=attention_dropout, use_bias=use_bias,
            add_self_loops=add_self_loops, implementation=implementation,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.score, self.negative_slope, self.scale = score, negative_slope, scale
        if score == "additive":
            shape = (num_heads, out_features)
            self.attn_sender = nnx.Param(_glorot(rngs.params(), shape, param_dtype))
            self.attn_receiver = nnx.Param(_glorot(rngs.params(), shape, param_dtype))
        else:
            self.attn_sender = self.attn_receiver = None

    def __call__(
        self,
        graph: jraph.GraphsTuple,
        *,
        layout: graph_ops.EdgeLayout | None = None,
        deterministic: bool | None = None,
        projected: bool = False,
    ) -> jraph.GraphsTuple:
        """`layout`: `jattn.graph.edge_layout` of the graph the attention runs on (after the
        self-loops this layer adds, if any); None computes it here. `projected=True`: the nodes
        are already `X @ self.linear.kernel` (`[N, num_heads * out_features]`, e.g. from a sparse
        matmul), so the projection is skipped."""
        inner, values, weights = self._prepare(graph, deterministic, projected)
        out = graph_ops.graph_attention(
            inner._replace(nodes=values),
            None if self.attn_sender is None else self.attn_sender[...],
            None if self.attn_receiver is None else self.attn_receiver[...],
            score=self.score, scale=self.scale, negative_slope=self.negative_slope,
            edge_weights=weights, layout=layout, implementation=self.implementation,
        ).nodes  # fmt: skip
        return self._merge(graph, out)


class HardGraphAttention(_HeadsOut):
    """hGAO layer: each node attends to its `k` best neighbours by `|X p| / ||p||`.

    `p` (`[in_features]`) scores the layer's input; the selected neighbours' projected features are
    gated by `sigmoid(score)` (which trains `p`), then attended over with the paper's dot-product
    score (`score="dot"`, default) or GAT's additive one (`score="additive"`, the DGL/GammaGL
    variant). `gate_query=True` gates the query node too (DGL). See `jattn.graph`.

    Example:
      >>> import jraph, jax.numpy as jnp
      >>> g = jraph.GraphsTuple(nodes=jnp.ones((4, 16)), edges=None, globals=None,
      ...     senders=jnp.array([0, 1, 2, 3]), receivers=jnp.array([1, 2, 3, 0]),
      ...     n_node=jnp.array([4]), n_edge=jnp.array([4]))
      >>> layer = HardGraphAttention(16, 8, num_heads=2, k=2, rngs=nnx.Rngs(0))
      >>> layer(g).nodes.shape
      (4, 16)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_heads: int = 1,
        *,
        k: int = 8,
        score: str = "dot",
        gate_query: bool = False,
        concat: bool = True,
        negative_slope: float = 0.2,
        scale: float | None = None,
        attention_dropout: float = 0.0,
        use_bias: bool = True,
        add_self_loops: bool = False,
        implementation: str | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self._init_heads(
            in_features, out_features, num_heads, concat=concat,
            attention_dropout=attention_dropout, use_bias=use_bias,
            add_self_loops=add_self_loops, implementation=implementation,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.k, self.score, self.gate_query = k, score, gate_query
        self.negative_slope, self.scale = negative_slope, scale
        self.projection = nnx.Param(
            jax.random.normal(rngs.params(), (in_features,), param_dtype) / in_features**0.5
        )
        if score == "additive":
            shape = (num_heads, out_features)
            self.attn_sender = nnx.Param(_glorot(rngs.params(), shape, param_dtype))
            self.attn_receiver = nnx.Param(_glorot(rngs.params(), shape, param_dtype))
        else:
            self.attn_sender = self.attn_receiver = None

    def __call__(
        self,
        graph: jraph.GraphsTuple,
        *,
        layout: graph_ops.EdgeLayout | None = None,
        deterministic: bool | None = None,
        projected: bool = False,
        node_scores: jax.Array | None = None,
    ) -> jraph.GraphsTuple:
        """`projected=True` with `node_scores`: the nodes are already `X @ self.linear.kernel`
        and `node_scores` is `X @ self.projection` (`[N]`), e.g. both from a sparse X."""
        if projected != (node_scores is not None):
            raise ValueError("pass node_scores exactly when projected=True")
        inner, values, weights = self._prepare(graph, deterministic, projected)
        out = graph_ops.hard_graph_attention(
            inner, self.projection[...], k=self.k, values=values, score=self.score,
            node_scores=node_scores,
            attn_sender=None if self.attn_sender is None else self.attn_sender[...],
            attn_receiver=None if self.attn_receiver is None else self.attn_receiver[...],
            scale=self.scale, negative_slope=self.negative_slope, gate_query=self.gate_query,
            edge_weights=weights, layout=layout, implementation=self.implementation,
        ).nodes  # fmt: skip
        return self._merge(graph, out)


class ChannelGraphAttention(nnx.Module):
    """cGAO layer: a linear projection, then attention between feature channels per graph.

    No adjacency is used (`O = softmax(scale * X^T X) X` per graph of the batch): cost
    O(N * out_features^2), independent of the number of edges. `normalize=True` uses cosine
    channel similarities (XCA's variant); the paper's form is `normalize=False`.

    Example:
      >>> import jraph, jax.numpy as jnp
      >>> g = jraph.GraphsTuple(nodes=jnp.ones((4, 16)), edges=None, globals=None,
      ...     senders=jnp.array([0]), receivers=jnp.array([1]),
      ...     n_node=jnp.array([4]), n_edge=jnp.array([1]))
      >>> ChannelGraphAttention(16, 8, rngs=nnx.Rngs(0))(g).nodes.shape
      (4, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | None = None,
        *,
        normalize: bool = False,
        scale: float | None = None,
        use_projection: bool = True,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_features = in_features if out_features is None else out_features
        if not use_projection and out_features != in_features:
            raise ValueError(
                f"use_projection=False needs out_features == in_features, got "
                f"{in_features} -> {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.normalize, self.scale = normalize, scale
        self.linear = (
            nnx.Linear(
                in_features,
                out_features,
                use_bias=False,
                kernel_init=_glorot,
                param_dtype=param_dtype,
                rngs=rngs,
            )  # fmt: skip
            if use_projection
            else None
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
        nodes = graph.nodes
        if nodes.ndim != 2 or nodes.shape[1] != self.in_features:
            raise ValueError(
                f"ChannelGraphAttention expects nodes [N, {self.in_features}], got {nodes.shape}"
            )
        x = nodes if self.linear is None else self.linear(nodes)
        out = graph_ops.channel_graph_attention(
            graph._replace(nodes=x), normalize=self.normalize, scale=self.scale
        ).nodes
        if self.bias is not None:
            out = out + self.bias[...][None]
        return graph._replace(nodes=out)
