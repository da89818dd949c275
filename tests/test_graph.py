"""jattn.graph: GAO, hGAO and cGAO against dense (adjacency-matrix) references on small graphs,
padding invariance, gradients, and the helpers (self-loops, top-k per receiver, edge layout)."""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from jattn import graph as jg

IMPLEMENTATIONS = ["fused", "fused_scatter", "xla"]
FWD_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def vgrad(fn, argnums):
    """jit(value_and_grad(fn, has_aux=True)): one compilation instead of op-by-op dispatch."""
    return jax.jit(jax.value_and_grad(fn, argnums, has_aux=True))


def random_graph(rng, n_node=(7, 5), edges_per_graph=(15, 9), heads=2, features=3):
    """A batch of random graphs with unique directed edges (self-loops allowed), some nodes
    without incoming edges, and node features [N, heads, F]."""
    senders, receivers, offset = [], [], 0
    for n, e in zip(n_node, edges_per_graph, strict=True):
        pairs = rng.choice(n * n, size=e, replace=False)
        s, r = pairs // n, pairs % n
        r = np.where(r == n - 1, 0, r)  # node n-1 of every graph receives nothing
        keep = np.unique(s * n + r, return_index=True)[1]
        senders.append(s[np.sort(keep)] + offset)
        receivers.append(r[np.sort(keep)] + offset)
        offset += n
    n_edge = np.array([len(s) for s in senders], np.int32)
    nodes = rng.standard_normal((offset, heads, features)).astype(np.float32)
    return jraph.GraphsTuple(
        nodes=jnp.asarray(nodes),
        edges=None,
        globals=None,
        senders=jnp.asarray(np.concatenate(senders).astype(np.int32)),
        receivers=jnp.asarray(np.concatenate(receivers).astype(np.int32)),
        n_node=jnp.asarray(np.array(n_node, np.int32)),
        n_edge=jnp.asarray(n_edge),
    )


def dense_adjacency(graph, num_nodes):
    a = np.zeros((num_nodes, num_nodes), bool)
    a[np.asarray(graph.receivers), np.asarray(graph.senders)] = True  # a[i, j]: edge j -> i
    return a


def dense_gao(values, adjacency, *, score, a_s=None, a_r=None, query=None, key=None, scale=1.0,
              slope=0.2, weights=None):  # fmt: skip
    """out[i] = sum_j softmax_j(e_ij over A[i, :]) * W_ij * v[j], dense [H, N, N] logits."""
    query = values if query is None else query
    key = values if key is None else key
    hi = jax.lax.Precision.HIGHEST
    if score == "additive":
        s = jnp.einsum("nhf,hf->hn", key, a_s, precision=hi)
        d = jnp.einsum("nhf,hf->hn", query, a_r, precision=hi)
        logits = jax.nn.leaky_relu(d[:, :, None] + s[:, None, :], slope)
    else:
        logits = scale * jnp.einsum("ihf,jhf->hij", query, key, precision=hi)
    adjacency = jnp.asarray(adjacency)[None]
    logits = jnp.where(adjacency, logits, -jnp.inf)
    row_max = jnp.max(jnp.where(adjacency, logits, -1e30), axis=-1, keepdims=True)
    p = jnp.where(adjacency, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
    alpha = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    if weights is not None:
        alpha = alpha * weights
    return jnp.einsum("hij,jhf->ihf", alpha, values, precision=hi)


def dense_weights(graph, edge_weights, num_nodes):
    w = np.zeros((edge_weights.shape[1], num_nodes, num_nodes), np.float32)
    w[:, np.asarray(graph.receivers), np.asarray(graph.senders)] = np.asarray(edge_weights).T
    return jnp.asarray(w)


def attention_params(rng, heads, features):
    return (
        jnp.asarray(rng.standard_normal((heads, features)), jnp.float32),
        jnp.asarray(rng.standard_normal((heads, features)), jnp.float32),
    )


# ------------------------------------------------------------------------------------------------
# GAO


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_gao_matches_dense_reference_with_gradients(rng, implementation, score):
    graph = random_graph(rng)
    n, heads, features = graph.nodes.shape
    adjacency = dense_adjacency(graph, n)
    a_s, a_r = attention_params(rng, heads, features)
    cot = jnp.asarray(rng.standard_normal((n, heads, features)), jnp.float32)
    scale = 0.7

    def ours(v, a_s, a_r):
        out = jg.graph_attention(
            graph._replace(nodes=v), a_s, a_r, score=score, scale=scale,
            implementation=implementation,
        )  # fmt: skip
        return jnp.sum(out.nodes * cot), out.nodes

    def dense(v, a_s, a_r):
        out = dense_gao(v, adjacency, score=score, a_s=a_s, a_r=a_r, scale=scale)
        return jnp.sum(out * cot), out

    argnums = (0, 1, 2) if score == "additive" else (0,)
    (_, got), got_grads = vgrad(ours, argnums)(graph.nodes, a_s, a_r)
    (_, want), want_grads = vgrad(dense, argnums)(graph.nodes, a_s, a_r)
    np.testing.assert_allclose(got, want, **FWD_TOL)
    assert np.all(np.asarray(got)[~adjacency.any(axis=1)] == 0)  # no incoming edge -> zeros
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gao_separate_query_key_edge_mask_and_weights(rng, implementation):
    graph = random_graph(rng, heads=3, features=4)
    n, heads, _ = graph.nodes.shape
    num_edges = graph.senders.shape[0]
    query = jnp.asarray(rng.standard_normal((n, heads, 5)), jnp.float32)
    key = jnp.asarray(rng.standard_normal((n, heads, 5)), jnp.float32)
    edge_mask = jnp.asarray(rng.random(num_edges) < 0.7)
    edge_weights = jnp.asarray(rng.random((num_edges, heads)) * 2, jnp.float32)
    cot = jnp.asarray(rng.standard_normal(graph.nodes.shape), jnp.float32)
    kept = graph._replace(
        senders=graph.senders[np.asarray(edge_mask)],
        receivers=graph.receivers[np.asarray(edge_mask)],
    )
    adjacency = dense_adjacency(kept, n)
    weights = dense_weights(graph, edge_weights, n)

    def ours(v, q, k):
        out = jg.graph_attention(
            graph._replace(nodes=v), score="dot", query=q, key=k, edge_mask=edge_mask,
            edge_weights=edge_weights, implementation=implementation,
        ).nodes  # fmt: skip
        return jnp.sum(out * cot), out

    def dense(v, q, k):
        out = dense_gao(v, adjacency, score="dot", query=q, key=k, weights=weights)
        return jnp.sum(out * cot), out

    (_, got), got_grads = vgrad(ours, (0, 1, 2))(graph.nodes, query, key)
    (_, want), want_grads = vgrad(dense, (0, 1, 2))(graph.nodes, query, key)
    np.testing.assert_allclose(got, want, **FWD_TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)


def test_gao_two_dimensional_nodes_are_one_head(rng):
    graph = random_graph(rng, heads=1, features=4)
    a_s, a_r = attention_params(rng, 1, 4)
    three = jg.graph_attention(graph, a_s, a_r).nodes
    two = jg.graph_attention(graph._replace(nodes=graph.nodes[:, 0]), a_s, a_r).nodes
    assert two.shape == (graph.nodes.shape[0], 4)
    np.testing.assert_allclose(two, three[:, 0], **FWD_TOL)


def test_gao_precomputed_layout_and_jit(rng):
    graph = random_graph(rng)
    a_s, a_r = attention_params(rng, *graph.nodes.shape[1:])
    layout = jg.edge_layout(graph)
    fn = jax.jit(lambda g, lay: jg.graph_attention(g, a_s, a_r, layout=lay).nodes)
    np.testing.assert_allclose(
        fn(graph, layout), jg.graph_attention(graph, a_s, a_r, implementation="xla").nodes,
        **FWD_TOL,
    )  # fmt: skip


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("row_width", [1, 3])
def test_fused_rows_split_high_degree_nodes(rng, score, row_width):
    """Narrow rows force nodes over several table rows (a hub receives from and sends to all)."""
    graph = random_graph(rng, n_node=(9,), edges_per_graph=(30,), heads=2, features=3)
    hub = np.arange(1, 9, dtype=np.int32)
    senders = np.concatenate([np.asarray(graph.senders), hub, np.zeros(8, np.int32)])
    receivers = np.concatenate([np.asarray(graph.receivers), np.zeros(8, np.int32), hub])
    pairs = np.unique(senders * 9 + receivers)
    graph = graph._replace(
        senders=jnp.asarray(pairs // 9, jnp.int32), receivers=jnp.asarray(pairs % 9, jnp.int32),
        n_edge=jnp.array([len(pairs)]),
    )  # fmt: skip
    layout = jg.edge_layout(graph, row_width=row_width)
    assert layout.in_edge.shape == (9 + -(-len(pairs) // row_width), row_width)
    n, heads, features = graph.nodes.shape
    adjacency = dense_adjacency(graph, n)
    a_s, a_r = attention_params(rng, heads, features)
    cot = jnp.asarray(rng.standard_normal((n, heads, features)), jnp.float32)

    def ours(v, a_s, a_r):
        out = jg.graph_attention(
            graph._replace(nodes=v), a_s, a_r, score=score, layout=layout, implementation="fused"
        ).nodes
        return jnp.sum(out * cot), out

    def dense(v, a_s, a_r):
        out = dense_gao(v, adjacency, score=score, a_s=a_s, a_r=a_r)
        return jnp.sum(out * cot), out

    (_, got), got_grads = vgrad(ours, (0, 1, 2))(graph.nodes, a_s, a_r)
    (_, want), want_grads = vgrad(dense, (0, 1, 2))(graph.nodes, a_s, a_r)
    np.testing.assert_allclose(got, want, **FWD_TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)


def pad_and_poison(graph, rng, extra_nodes=5, extra_edges=7):
    n, e = graph.nodes.shape[0], graph.senders.shape[0]
    padded = jraph.pad_with_graphs(graph, n + extra_nodes, e + extra_edges, n_graph=4)
    # jraph pads with zeros: put large random features on padding nodes so a leak would show.
    nodes = np.asarray(padded.nodes).copy()
    nodes[n:] = 100 * rng.standard_normal(nodes[n:].shape)
    return padded._replace(nodes=jnp.asarray(nodes))


@pytest.mark.parametrize(
    "operator,implementation",
    [(op, impl) for op in ("gao_additive", "gao_dot", "hgao") for impl in IMPLEMENTATIONS]
    + [("cgao", None)],
)
def test_padding_never_changes_real_nodes(rng, implementation, operator):
    graph = random_graph(rng)
    graph = graph._replace(nodes=graph.nodes.reshape(graph.nodes.shape[0], -1))  # [N, D]
    n, d = graph.nodes.shape
    padded = pad_and_poison(graph, rng)
    p = jnp.asarray(rng.standard_normal(d), jnp.float32)
    a_s, a_r = attention_params(rng, 1, d)
    cot = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)

    def apply(g, p, a_s):
        if operator == "cgao":
            return jg.channel_graph_attention(g, normalize=True).nodes
        if operator == "hgao":
            return jg.hard_graph_attention(g, p, k=2, implementation=implementation).nodes
        score = operator.removeprefix("gao_")
        return jg.graph_attention(
            g, a_s, a_r, score=score, scale=0.3, implementation=implementation
        ).nodes

    def loss(x, p, a_s, g):
        out = apply(g._replace(nodes=x), p, a_s)
        return jnp.sum(out[:n] * cot), out

    (_, plain), plain_grads = vgrad(loss, (0, 1, 2))(graph.nodes, p, a_s, graph)
    (_, pad), pad_grads = vgrad(loss, (0, 1, 2))(padded.nodes, p, a_s, padded)
    assert np.all(np.isfinite(pad))
    np.testing.assert_allclose(pad[:n], plain, **FWD_TOL)
    np.testing.assert_allclose(pad_grads[0][:n], plain_grads[0], **GRAD_TOL)
    np.testing.assert_array_equal(pad_grads[0][n:], 0.0)
    for g, w in zip(pad_grads[1:], plain_grads[1:], strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)


# ------------------------------------------------------------------------------------------------
# hGAO


def brute_force_top_k(graph, scores, k, num_nodes):
    senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
    keep = np.zeros(len(senders), bool)
    for i in range(num_nodes):
        edges = np.flatnonzero(receivers == i)
        ranked = sorted(edges, key=lambda e: (-scores[senders[e]], e))
        keep[ranked[:k]] = True
    return keep


@pytest.mark.parametrize("k", [1, 2, 3, 100])
def test_top_k_edges_per_receiver_without_dense_adjacency(rng, k):
    graph = random_graph(rng, n_node=(9, 4), edges_per_graph=(40, 10))
    n = graph.nodes.shape[0]
    scores = rng.standard_normal(n).astype(np.float32)
    scores[3] = scores[5]  # a tie: the lower edge index wins
    perm = rng.permutation(graph.senders.shape[0])  # edges in no particular order
    graph = graph._replace(senders=graph.senders[perm], receivers=graph.receivers[perm])
    got = jax.jit(jg.top_k_edges, static_argnums=2)(graph, jnp.asarray(scores), k)
    np.testing.assert_array_equal(got, brute_force_top_k(graph, scores, k, n))
    in_degree = np.bincount(np.asarray(graph.receivers), minlength=n)
    kept = np.bincount(np.asarray(graph.receivers)[np.asarray(got)], minlength=n)
    np.testing.assert_array_equal(kept, np.minimum(in_degree, k))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("score,gate_query", [("dot", False), ("dot", True), ("additive", False)])
def test_hgao_matches_dense_reference_with_gradients(rng, implementation, score, gate_query):
    graph = random_graph(rng, n_node=(8, 6), edges_per_graph=(30, 14))
    x = graph.nodes.reshape(graph.nodes.shape[0], -1)  # [N, D]
    n, d = x.shape
    heads, features = 2, 4
    w = jnp.asarray(rng.standard_normal((d, heads, features)) / np.sqrt(d), jnp.float32)
    p = jnp.asarray(rng.standard_normal(d), jnp.float32)
    a_s, a_r = attention_params(rng, heads, features)
    k = 2
    cot = jnp.asarray(rng.standard_normal((n, heads, features)), jnp.float32)
    y = np.abs(np.asarray(x, np.float64) @ np.asarray(p, np.float64)) / np.linalg.norm(p)
    kept = np.asarray(brute_force_top_k(graph, y, k, n))
    adjacency = dense_adjacency(
        graph._replace(senders=graph.senders[kept], receivers=graph.receivers[kept]), n
    )
    scale = 0.5

    def ours(x, p, w, a_s, a_r):
        values = jnp.einsum("nd,dhf->nhf", x, w)
        out = jg.hard_graph_attention(
            graph._replace(nodes=x), p, k=k, values=values, score=score, attn_sender=a_s,
            attn_receiver=a_r, scale=scale, gate_query=gate_query, implementation=implementation,
        ).nodes  # fmt: skip
        return jnp.sum(out * cot), out

    def dense(x, p, w, a_s, a_r):
        values = jnp.einsum("nd,dhf->nhf", x, w)
        gate = jax.nn.sigmoid(jnp.abs(x @ p) / jnp.linalg.norm(p))[:, None, None]
        gated = values * gate
        query = gated if gate_query else values
        out = dense_gao(
            gated, adjacency, score=score, a_s=a_s, a_r=a_r, query=query, key=gated, scale=scale
        )
        return jnp.sum(out * cot), out

    args = (x, p, w, a_s, a_r)
    argnums = (0, 1, 2, 3, 4) if score == "additive" else (0, 1, 2)
    (_, got), got_grads = vgrad(ours, argnums)(*args)
    (_, want), want_grads = vgrad(dense, argnums)(*args)
    np.testing.assert_allclose(got, want, **FWD_TOL)
    assert float(jnp.max(jnp.abs(got_grads[1]))) > 0  # p is trained through the gate
    for g, wg in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, wg, **GRAD_TOL)


def test_hgao_keeps_only_top_k_neighbours(rng):
    # A star: node 0 receives from 1..6; with k=2 only the two best-scored senders count.
    n = 7
    senders = jnp.arange(1, n, dtype=jnp.int32)
    graph = jraph.GraphsTuple(
        nodes=jnp.asarray(rng.standard_normal((n, 3)), jnp.float32), edges=None, globals=None,
        senders=senders, receivers=jnp.zeros(n - 1, jnp.int32),
        n_node=jnp.array([n]), n_edge=jnp.array([n - 1]),
    )  # fmt: skip
    p = jnp.asarray(rng.standard_normal(3), jnp.float32)
    y = np.abs(np.asarray(graph.nodes) @ np.asarray(p))
    best = np.argsort(-y[1:])[:2] + 1
    v = jnp.asarray(rng.standard_normal((n, 2)), jnp.float32)
    base = jg.hard_graph_attention(graph, p, k=2, values=v).nodes[0]
    others = np.setdiff1d(np.arange(1, n), best)
    v2 = v.at[others].set(1e3)  # changing non-selected neighbours changes nothing
    np.testing.assert_allclose(jg.hard_graph_attention(graph, p, k=2, values=v2).nodes[0], base)
    v3 = v.at[best[0]].add(1.0)  # changing a selected one does
    assert not np.allclose(jg.hard_graph_attention(graph, p, k=2, values=v3).nodes[0], base)


# ------------------------------------------------------------------------------------------------
# cGAO


def dense_cgao(x, n_node, normalize, scale):
    x = np.asarray(x, np.float64)
    out, start = np.zeros_like(x), 0
    for n in np.asarray(n_node):
        xg = x[start : start + n]  # [n, H, F]
        for h in range(x.shape[1]):
            xh = xg[:, h]
            keys = xh / np.maximum(np.linalg.norm(xh, axis=0), 1e-30) if normalize else xh
            e = scale * keys.T @ keys
            a = np.exp(e - e.max(axis=-1, keepdims=True))
            a /= a.sum(axis=-1, keepdims=True)
            out[start : start + n, h] = xh @ a.T
        start += n
    return out


@pytest.mark.parametrize("normalize,scale", [(False, None), (True, 2.0)])
def test_cgao_per_graph_matches_dense_reference(rng, normalize, scale):
    graph = random_graph(rng, n_node=(6, 1, 9), edges_per_graph=(5, 1, 12), heads=2, features=5)
    graph = graph._replace(nodes=graph.nodes * 0.5)
    got = jg.channel_graph_attention(graph, normalize=normalize, scale=scale).nodes
    want = dense_cgao(graph.nodes, graph.n_node, normalize, 1.0 if scale is None else scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Per graph: the batch equals every graph on its own.
    alone = jg.channel_graph_attention(
        jraph.GraphsTuple(
            nodes=graph.nodes[:6], edges=None, globals=None, senders=graph.senders[:0],
            receivers=graph.receivers[:0], n_node=jnp.array([6]), n_edge=jnp.array([0]),
        ), normalize=normalize, scale=scale,
    ).nodes  # fmt: skip
    np.testing.assert_allclose(got[:6], alone, rtol=1e-5, atol=1e-6)


def test_cgao_gradient_matches_dense_autodiff(rng):
    graph = random_graph(rng, n_node=(5, 4), edges_per_graph=(5, 4), heads=1, features=4)
    x = graph.nodes[:, 0]
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def ours(x):
        return jnp.sum(
            jg.channel_graph_attention(graph._replace(nodes=x), normalize=True).nodes * cot
        )

    def dense(x):
        outs = []
        for lo, hi in ((0, 5), (5, 9)):
            xh = x[lo:hi]
            keys = xh / jnp.linalg.norm(xh, axis=0)[None]
            outs.append(xh @ jax.nn.softmax(keys.T @ keys, axis=-1).T)
        return jnp.sum(jnp.concatenate(outs) * cot)

    np.testing.assert_allclose(jax.jit(jax.grad(ours))(x), jax.jit(jax.grad(dense))(x), **GRAD_TOL)


# ------------------------------------------------------------------------------------------------
# Helpers and argument checks


def test_add_self_loops_keeps_graphs_contiguous_and_padding_masks_valid(rng):
    graph = random_graph(rng, n_node=(4, 3), edges_per_graph=(5, 3))
    num_edges = graph.senders.shape[0]
    graph = graph._replace(edges=jnp.asarray(rng.standard_normal((num_edges, 2)), jnp.float32))
    padded = jraph.pad_with_graphs(graph, 10, 12, n_graph=3)
    looped = jax.jit(jg.add_self_loops)(padded)
    np.testing.assert_array_equal(looped.n_edge, np.asarray(padded.n_edge) + padded.n_node)
    # Every graph's edges (old ones first, then its loops) stay inside its own node range.
    starts = np.concatenate([[0], np.cumsum(looped.n_node)])
    edge_starts = np.concatenate([[0], np.cumsum(looped.n_edge)])
    for g in range(3):
        lo, hi = edge_starts[g], edge_starts[g + 1]
        s, r = np.asarray(looped.senders[lo:hi]), np.asarray(looped.receivers[lo:hi])
        assert np.all((s >= starts[g]) & (s < starts[g + 1]))
        n_old = int(padded.n_edge[g])
        np.testing.assert_array_equal(s[n_old:], np.arange(starts[g], starts[g + 1]))
        np.testing.assert_array_equal(s[n_old:], r[n_old:])
    edge_mask = np.asarray(jraph.get_edge_padding_mask(looped))
    real_edges = int(np.sum(graph.n_edge))
    assert edge_mask.sum() == real_edges + 7  # the real edges and the real nodes' loops
    e0 = int(graph.n_edge[0])
    np.testing.assert_array_equal(np.asarray(looped.edges)[:e0], np.asarray(graph.edges)[:e0])
    np.testing.assert_array_equal(np.asarray(looped.edges)[e0 : e0 + 4], 0.0)  # graph 0's loops


def test_bad_arguments_raise_value_error_naming_shapes(rng):
    graph = random_graph(rng)
    heads, features = graph.nodes.shape[1:]
    a_s, a_r = attention_params(rng, heads, features)
    with pytest.raises(ValueError, match=r"attn_sender.*\(2, 3\)"):
        jg.graph_attention(graph, a_s[:, :2], a_r)
    with pytest.raises(ValueError, match="score"):
        jg.graph_attention(graph, a_s, a_r, score="gaussian")
    with pytest.raises(ValueError, match="edge_weights"):
        jg.graph_attention(graph, a_s, a_r, edge_weights=jnp.ones((3, heads)))
    with pytest.raises(ValueError, match="implementation"):
        jg.graph_attention(graph, a_s, a_r, implementation="pallas")
    flat = graph._replace(nodes=graph.nodes.reshape(graph.nodes.shape[0], -1))
    with pytest.raises(ValueError, match=r"projection \(4,\)"):
        jg.hard_graph_attention(flat, jnp.ones(4), k=2)
    with pytest.raises(ValueError, match="k must be"):
        jg.hard_graph_attention(flat, jnp.ones(6), k=0)
    with pytest.raises(ValueError, match="graph.nodes"):
        jg.channel_graph_attention(graph._replace(nodes=jnp.ones(3)))


@pytest.mark.gpu
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_fused_paths_match_xla_on_gpu_at_scale(score):
    """200k random edges on the device: the fused paths (sorted and scatter) equal the plain XLA
    segment version, forward and gradients."""
    key = jax.random.split(jax.random.key(0), 6)
    n, e, heads, features = 20_000, 200_000, 8, 8
    graph = jraph.GraphsTuple(
        nodes=jax.random.normal(key[0], (n, heads, features)), edges=None, globals=None,
        senders=jax.random.randint(key[1], (e,), 0, n),
        receivers=jax.random.randint(key[2], (e,), 0, n),
        n_node=jnp.array([n]), n_edge=jnp.array([e]),
    )  # fmt: skip
    a_s = jax.random.normal(key[3], (heads, features))
    a_r = jax.random.normal(key[4], (heads, features))
    cot = jax.random.normal(key[5], (n, heads, features))

    def loss(v, a_s, a_r, g, implementation):  # the graph is an argument, not a constant
        out = jg.graph_attention(
            g._replace(nodes=v), a_s, a_r, score=score, scale=0.3, implementation=implementation
        ).nodes
        return jnp.sum(out * cot), out

    results = {
        impl: jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=4)(
            graph.nodes, a_s, a_r, graph, impl
        )
        for impl in IMPLEMENTATIONS
    }
    (_, want), want_grads = results["xla"]
    for impl in ("fused", "fused_scatter"):
        (_, got), got_grads = results[impl]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        for g, w in zip(got_grads, want_grads, strict=True):
            scale = float(jnp.max(jnp.abs(w)))
            np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale)


def test_default_implementation_is_fused_on_gpus_only(monkeypatch):
    assert jg._implementation(None) == "xla"  # CPU: nothing compared there
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert jg._implementation(None) == "fused"  # measured fastest on an H100
    assert jg._implementation("xla") == "xla"
    with pytest.raises(ValueError, match="implementation must be one of"):
        jg._implementation("cuda")
