"""jattn.graph hardening: what a node cannot see never reaches it (NaN/inf on padding nodes and
behind masked edges), graphs without nodes or edges, argument checks, float64 precision, and
`reference.segment_softmax` against jraph's."""

import functools

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from test_graph import (
    FWD_TOL,
    GRAD_TOL,
    IMPLEMENTATIONS,
    attention_params,
    dense_adjacency,
    dense_gao,
    random_graph,
    vgrad,
)

from jattn import graph as jg
from jattn import reference

OPERATORS = [(op, impl) for op in ("gao_additive", "gao_dot", "hgao") for impl in IMPLEMENTATIONS]
OPERATORS += [("cgao", None)]


def apply_op(operator, implementation, g, p, a_s, a_r, edge_mask=None):
    if operator == "cgao":
        return jg.channel_graph_attention(g, normalize=True).nodes
    if operator == "hgao":
        return jg.hard_graph_attention(
            g, p, k=2, edge_mask=edge_mask, implementation=implementation
        ).nodes
    return jg.graph_attention(
        g,
        a_s,
        a_r,
        score=operator.removeprefix("gao_"),
        scale=0.3,
        edge_mask=edge_mask,
        implementation=implementation,
    ).nodes


def flat_graph(rng):
    graph = random_graph(rng)
    return graph._replace(nodes=graph.nodes.reshape(graph.nodes.shape[0], -1))  # [N, D]


@pytest.mark.parametrize("operator,implementation", OPERATORS)
def test_nan_and_inf_on_padding_nodes_never_reach_real_nodes(rng, operator, implementation):
    """jraph.pad_with_graphs padding nodes holding NaN and inf (an earlier layer's output on rows
    nobody reads): the real nodes' outputs and their gradients equal the unpadded graph's."""
    graph = flat_graph(rng)
    n, d = graph.nodes.shape
    e = graph.senders.shape[0]
    padded = jraph.pad_with_graphs(graph, n + 5, e + 7, n_graph=4)
    nodes = np.asarray(padded.nodes).copy()
    nodes[n:] = np.nan
    nodes[n + 1 :: 2, ::2] = np.inf
    padded = padded._replace(nodes=jnp.asarray(nodes))
    p = jnp.asarray(rng.standard_normal(d), jnp.float32)
    a_s, a_r = attention_params(rng, 1, d)
    cot = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)

    def loss(x, g):
        out = apply_op(operator, implementation, g._replace(nodes=x), p, a_s, a_r)
        return jnp.sum(out[:n] * cot), out

    (_, plain), (plain_dx,) = vgrad(loss, (0,))(graph.nodes, graph)
    (_, pad), (pad_dx,) = vgrad(loss, (0,))(padded.nodes, padded)
    assert np.all(np.isfinite(pad[:n])) and np.all(np.isfinite(pad_dx[:n]))
    np.testing.assert_allclose(pad[:n], plain, **FWD_TOL)
    np.testing.assert_allclose(pad_dx[:n], plain_dx, **GRAD_TOL)


@pytest.mark.parametrize("operator,implementation", OPERATORS[:-1])
def test_masked_edges_of_a_nan_node_are_absent(rng, operator, implementation):
    """A real node with NaN features whose outgoing edges are all masked out: every other node's
    output and gradient equal those of the graph without these edges (absent, not weight 0)."""
    graph = flat_graph(rng)
    n, d = graph.nodes.shape
    senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
    bad = int(senders[np.argmax(senders != receivers)])  # a node that sends to another
    mask = (senders != bad) & (receivers != bad)
    nodes = np.asarray(graph.nodes).copy()
    nodes[bad] = np.nan
    p = jnp.asarray(rng.standard_normal(d), jnp.float32)
    a_s, a_r = attention_params(rng, 1, d)
    others = np.arange(n) != bad
    cot = jnp.asarray(rng.standard_normal((n, d)) * others[:, None], jnp.float32)
    kept = graph._replace(senders=graph.senders[mask], receivers=graph.receivers[mask])

    def loss(x, g, edge_mask):
        out = apply_op(operator, implementation, g._replace(nodes=x), p, a_s, a_r, edge_mask)
        return jnp.sum(jnp.where(others[:, None], out * cot, 0.0)), out

    (_, want), (want_dx,) = vgrad(loss, (0,))(graph.nodes, kept, None)
    (_, got), (got_dx,) = vgrad(loss, (0,))(jnp.asarray(nodes), graph, jnp.asarray(mask))
    assert np.all(np.isfinite(got[others])) and np.all(np.isfinite(got_dx[others]))
    np.testing.assert_allclose(got[others], want[others], **FWD_TOL)
    np.testing.assert_allclose(got_dx[others], want_dx[others], **GRAD_TOL)


def empty_graph(num_nodes, num_edges, features=3):
    return jraph.GraphsTuple(
        nodes=jnp.ones((num_nodes, 2, features)),
        edges=None,
        globals=None,
        senders=jnp.zeros(num_edges, jnp.int32),
        receivers=jnp.zeros(num_edges, jnp.int32),
        n_node=jnp.array([num_nodes], jnp.int32),
        n_edge=jnp.array([num_edges], jnp.int32),
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_graph_without_nodes_gives_empty_output(implementation):
    graph = empty_graph(0, 0)
    a = jnp.ones((2, 3))
    for score in ("additive", "dot"):
        fn = jax.jit(
            lambda x, a, score=score: (
                jg.graph_attention(
                    graph._replace(nodes=x), a, a, score=score, implementation=implementation
                ).nodes
            )
        )
        assert fn(graph.nodes, a).shape == (0, 2, 3)
        assert jax.grad(lambda a, fn=fn: jnp.sum(fn(graph.nodes, a)))(a).shape == (2, 3)
    flat = graph._replace(nodes=jnp.ones((0, 4)))
    out = jg.hard_graph_attention(flat, jnp.ones(4), k=2, implementation=implementation).nodes
    assert out.shape == (0, 4)
    assert jg.channel_graph_attention(flat).nodes.shape == (0, 4)
    assert jg.top_k_edges(flat, jnp.ones(0), 2).shape == (0,)
    layout = jg.edge_layout(graph)
    assert layout.in_edge.shape[0] == 0
    # Edges into a graph with no nodes are out of range: ignored.
    assert jg.graph_attention(empty_graph(0, 3), a, a).nodes.shape == (0, 2, 3)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_graph_without_edges_gives_zeros(rng, implementation):
    graph = empty_graph(4, 0)._replace(nodes=jnp.asarray(rng.standard_normal((4, 2, 3))))
    a_s, a_r = attention_params(rng, 2, 3)

    @jax.jit
    def both(graph, a_s, a_r):
        gao = jg.graph_attention(graph, a_s, a_r, implementation=implementation).nodes
        flat = graph._replace(nodes=graph.nodes.reshape(4, 6))
        hgao = jg.hard_graph_attention(flat, jnp.ones(6), k=1, implementation=implementation)
        return gao, hgao.nodes

    for out in both(graph, a_s, a_r):
        np.testing.assert_array_equal(out, 0.0)


def test_hgao_zero_projection_is_finite(rng, implementation="xla"):
    """p = 0: y = |X p| / ||p|| is 0 for every node (a safe norm), never 0/0 = NaN, and the
    gradient with respect to p is finite (the score is computed before any implementation)."""
    graph = flat_graph(rng)
    d = graph.nodes.shape[1]

    def loss(p, x):
        out = jg.hard_graph_attention(
            graph._replace(nodes=x), p, k=2, implementation=implementation
        ).nodes
        return jnp.sum(out**2), out

    (_, out), grads = vgrad(loss, (0, 1))(jnp.zeros(d), graph.nodes)
    assert np.all(np.isfinite(out)) and np.any(out != 0)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # Every score ties at 0: the node_scores path with zeros gives the same result.
    same = jax.jit(
        lambda: jg.hard_graph_attention(
            graph, jnp.zeros(d), k=2, values=graph.nodes,
            node_scores=jnp.zeros(graph.nodes.shape[0]), implementation=implementation,
        ).nodes
    )()  # fmt: skip
    np.testing.assert_allclose(out, same, **FWD_TOL)


def test_graph_arguments_of_the_wrong_kind_raise_value_error(rng):
    graph = flat_graph(rng)
    n, d = graph.nodes.shape
    e = graph.senders.shape[0]
    p = jnp.ones(d)
    a = jnp.ones((1, d))
    for k in (2.0, 2.7, True, "2", 0, -1):
        with pytest.raises(ValueError, match="k must be"):
            jg.hard_graph_attention(graph, p, k=k)
        with pytest.raises(ValueError, match="k must be"):
            jg.top_k_edges(graph, jnp.ones(n), k)
    float_mask = jnp.ones(e, jnp.float32)
    with pytest.raises(ValueError, match="edge_mask must be a boolean"):
        jg.graph_attention(graph, a, a, edge_mask=float_mask)
    with pytest.raises(ValueError, match="edge_mask must be a boolean"):
        jg.hard_graph_attention(graph, p, k=2, edge_mask=float_mask)
    with pytest.raises(ValueError, match="edge_mask must be a boolean"):
        jg.top_k_edges(graph, jnp.ones(n), 2, edge_mask=jnp.ones(e, jnp.int32))
    with pytest.raises(ValueError, match=r"edge_mask must have shape \[E\]"):
        jg.graph_attention(graph, a, a, edge_mask=jnp.ones(e + 1, bool))
    for width in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="row_width"):
            jg.edge_layout(graph, row_width=width)
    assert jg.top_k_edges(graph, jnp.ones(n), np.int64(2)).dtype == jnp.bool_


def dense_reference_64(graph, values, a_s, a_r, score):
    adjacency = dense_adjacency(graph, values.shape[0])
    return dense_gao(values, adjacency, score=score, a_s=a_s, a_r=a_r, scale=0.7)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float64_inputs_are_computed_in_float64(rng, implementation):
    """Graph ops on float64 inputs compute in float64 (no float32 logits): they match a float64
    dense reference to ~1e-12, far below float32 rounding (~1e-7)."""
    with jax.enable_x64(True):
        graph = random_graph(rng)
        values = jnp.asarray(np.asarray(graph.nodes, np.float64) * 3)
        graph = graph._replace(nodes=values)
        a_s, a_r = (x.astype(jnp.float64) * 2 for x in attention_params(rng, 2, 3))
        tol = dict(rtol=1e-11, atol=1e-11)
        for score in ("additive", "dot"):

            def ours(v, a_s, score=score):
                out = jg.graph_attention(
                    graph._replace(nodes=v), a_s, a_r, score=score, scale=0.7,
                    implementation=implementation,
                ).nodes  # fmt: skip
                return jnp.sum(jnp.sin(out)), out

            def dense(v, a_s, score=score):
                out = dense_reference_64(graph, v, a_s, a_r, score)
                return jnp.sum(jnp.sin(out)), out

            (_, got), got_grads = vgrad(ours, (0, 1))(values, a_s)
            (_, want), want_grads = vgrad(dense, (0, 1))(values, a_s)
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, want, **tol)
            for g, w in zip(got_grads, want_grads, strict=True):
                np.testing.assert_allclose(g, w, **tol)
        # cGAO: against the same formula written densely per graph.
        flat = graph._replace(nodes=values.reshape(values.shape[0], -1))
        got = jg.channel_graph_attention(flat, scale=0.3).nodes
        x = np.asarray(flat.nodes)
        ends = np.cumsum(np.asarray(graph.n_node))
        want = []
        for xg in np.split(x, ends[:-1]):
            attn = np.asarray(jax.nn.softmax(0.3 * (xg.T @ xg), axis=-1))
            want.append(xg @ attn.T)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, np.concatenate(want), **tol)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_inputs_accumulate_in_float32(rng, implementation):
    """16-bit inputs: logits, softmax and the sum over a node's edges in float32, one rounding at
    the end: a node with 96 senders gets the float32 result on the same (bf16) inputs to within
    one bf16 rounding (a bf16 running sum would be off by several)."""
    n = 97
    senders = jnp.arange(1, n, dtype=jnp.int32)
    graph = jraph.GraphsTuple(
        nodes=jnp.asarray(1 + rng.random((n, 1, 16)), jnp.bfloat16), edges=None, globals=None,
        senders=senders, receivers=jnp.zeros_like(senders),
        n_node=jnp.array([n]), n_edge=jnp.array([n - 1]),
    )  # fmt: skip
    a_s, a_r = (0.1 * x.astype(jnp.bfloat16) for x in attention_params(rng, 1, 16))

    @functools.partial(jax.jit, static_argnames="score")
    def both(graph, a_s, a_r, score):
        got = jg.graph_attention(
            graph, a_s, a_r, score=score, scale=0.05, implementation=implementation
        ).nodes[0]
        want = jg.graph_attention(
            graph._replace(nodes=graph.nodes.astype(jnp.float32)), a_s.astype(jnp.float32),
            a_r.astype(jnp.float32), score=score, scale=0.05, implementation="xla",
        ).nodes[0]  # fmt: skip
        return got, want

    for score in ("additive", "dot"):
        got, want = both(graph, a_s, a_r, score)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2**-8, atol=0
        )


# ------------------------------------------------------------------------------------------------
# reference.segment_softmax against jraph.segment_softmax


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_segment_softmax_nan_and_inf_like_jraph(rng, poison):
    logits = rng.standard_normal((9, 2)).astype(np.float32)
    ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    logits[1, 0] = poison  # segment 0, head 0
    got = reference.segment_softmax(jnp.asarray(logits), jnp.asarray(ids), 3)
    want = jraph.segment_softmax(jnp.asarray(logits), jnp.asarray(ids), 3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # NaN where jraph has NaN
    assert np.all(np.isnan(got[:3, 0])) and np.all(np.isfinite(got[3:]))


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.float16, np.float32])
def test_segment_softmax_dtype_like_jraph(rng, dtype):
    logits = jnp.asarray(rng.integers(-3, 4, size=(7,)).astype(dtype))
    ids = jnp.asarray([0, 0, 1, 1, 1, 2, 2])
    got = reference.segment_softmax(logits, ids, 3)
    want = jraph.segment_softmax(logits, ids, 3)
    assert got.dtype == want.dtype
    tol = 1e-3 if dtype == np.float16 else 1e-6
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol)
    np.testing.assert_allclose(jax.ops.segment_sum(got.astype(jnp.float32), ids, 3), 1.0, rtol=tol)
