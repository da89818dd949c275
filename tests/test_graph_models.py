"""The NNX graph layers, the Planetoid loader (and its safe unpickler) and the GAT / hGANet / cGANet
training scripts (a few epochs on Cora each)."""

import collections
import json
import os
import pickle

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from flax import nnx

from jattn import graph as jg
from jattn.nn import ChannelGraphAttention, GraphAttention, HardGraphAttention
from models import planetoid

DATA = planetoid.DEFAULT_DATA_DIR
needs_data = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"Planetoid data not found at {DATA} (--data-dir, $JATTN_PLANETOID_DIR)",
)


def ring(rng, n=6, features=5):
    senders = np.arange(n, dtype=np.int32)
    return jraph.GraphsTuple(
        nodes=jnp.asarray(rng.standard_normal((n, features)), jnp.float32), edges=None,
        globals=None, senders=jnp.asarray(senders), receivers=jnp.asarray((senders + 1) % n),
        n_node=jnp.array([n]), n_edge=jnp.array([n]),
    )  # fmt: skip


@pytest.mark.parametrize("concat", [True, False])
def test_graph_attention_layer_is_the_operator_with_its_parameters(rng, concat):
    graph = ring(rng)
    layer = GraphAttention(5, 3, num_heads=2, concat=concat, add_self_loops=True, rngs=nnx.Rngs(0))
    out = layer(graph).nodes
    looped = jg.add_self_loops(graph)
    values = (graph.nodes @ layer.linear.kernel[...]).reshape(6, 2, 3)
    want = jg.graph_attention(
        looped._replace(nodes=values), layer.attn_sender[...], layer.attn_receiver[...],
        implementation="xla",
    ).nodes  # fmt: skip
    want = want.reshape(6, 6) if concat else want.mean(axis=1)
    np.testing.assert_allclose(out, want + layer.bias[...][None], rtol=1e-5, atol=1e-6)
    assert out.shape == ((6, 6) if concat else (6, 3))


def test_attention_dropout_only_in_training(rng):
    graph = ring(rng)
    layer = GraphAttention(5, 4, num_heads=2, attention_dropout=0.5, add_self_loops=True,
                           rngs=nnx.Rngs(0))  # fmt: skip
    layer.eval()
    a, b = layer(graph).nodes, layer(graph).nodes
    np.testing.assert_array_equal(a, b)
    layer.train()
    c = layer(graph).nodes
    assert not np.allclose(a, c)


def test_hard_and_channel_layers(rng):
    graph = ring(rng, n=7, features=6)
    hard = HardGraphAttention(6, 4, num_heads=2, k=1, add_self_loops=True, rngs=nnx.Rngs(1))
    out = hard(graph).nodes
    assert out.shape == (7, 8) and np.all(np.isfinite(out))
    grads = nnx.grad(lambda m: jnp.sum(m(graph).nodes ** 2))(hard)
    assert float(jnp.max(jnp.abs(grads["projection"][...]))) > 0  # p trains through the gate
    channel = ChannelGraphAttention(6, 4, rngs=nnx.Rngs(2))
    x = graph.nodes @ channel.linear.kernel[...]
    want = jg.channel_graph_attention(graph._replace(nodes=x)).nodes + channel.bias[...][None]
    np.testing.assert_allclose(channel(graph).nodes, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"nodes \[N, 6\]"):
        channel(graph._replace(nodes=graph.nodes[:, :3]))
    with pytest.raises(ValueError, match=r"expects nodes \[N, 6\]"):
        hard(graph._replace(nodes=graph.nodes[:, :3]))


@pytest.mark.parametrize("reading", ["gcn", "linear", "gcn-first"])
def test_hganet_gam_readings(rng, reading):
    """`--gam gcn|linear|gcn-first`: the hGAO output through a GCN layer (ELU between) or a
    linear layer, or a GCN layer (and ELU) before it, checked against the layers written out
    densely; a GANet with them trains a step."""
    import optax

    from models.graph_training import DenseAttentionNet
    from models.hganet import GraphAttentionModule

    n, features, classes = 7, 6, 3
    graph = jg.add_self_loops(ring(rng, n=n, features=features))
    adj = np.zeros((n, n))
    adj[np.asarray(graph.receivers), np.asarray(graph.senders)] = 1.0
    d = 1 / np.sqrt(adj.sum(1))
    smooth = d[:, None] * adj * d[None]  # D^-1/2 (A + I) D^-1/2 of the looped ring

    def dense(layer, x):  # x W + b in float64
        kernel, bias = (np.asarray(p[...], np.float64) for p in (layer.kernel, layer.bias))
        return x @ kernel + bias

    def elu(x):
        return np.where(x > 0, x, np.expm1(x))

    first = reading == "gcn-first"
    operator = HardGraphAttention(3 if first else features, 4, num_heads=2, k=2, rngs=nnx.Rngs(1))
    module = GraphAttentionModule(
        operator, reading, in_features=features, out_features=5, rngs=nnx.Rngs(2)
    )
    x = np.asarray(graph.nodes, np.float64)
    if first:
        hidden = elu(dense(module.extra.linear, smooth @ x))
        want = operator(graph._replace(nodes=jnp.asarray(hidden, jnp.float32))).nodes
        bare = None  # the operator cannot take the raw input (its width is the GCN's)
    else:
        bare = np.asarray(operator(graph).nodes, np.float64)
        if reading == "gcn":
            want = dense(module.extra.linear, smooth @ elu(bare))
        else:
            want = dense(module.extra, bare)
    out = module(graph).nodes
    assert out.shape == ((n, 8) if first else (n, 5))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    if bare is not None:
        assert not np.allclose(out, bare[:, :5], atol=1e-2)  # not the bare operator

    def make(width, rngs):
        layer = HardGraphAttention(3 if first else width, 4, num_heads=2, k=2, rngs=rngs)
        gam = GraphAttentionModule(layer, reading, in_features=width, out_features=5, rngs=rngs)
        return gam, 8 if first else 5

    net = DenseAttentionNet(features, classes, make, hidden=8, num_modules=2, dropout=0.5,
                            rngs=nnx.Rngs(params=0, dropout=1))  # fmt: skip
    labels = jnp.asarray(rng.integers(0, classes, n))
    optimizer = nnx.Optimizer(net, optax.adam(0.01), wrt=nnx.Param)

    def loss_fn(model):
        logits = model(graph, graph.nodes)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    before = jax.tree.map(np.asarray, nnx.state(net.blocks[0].extra, nnx.Param))
    loss, grads = nnx.value_and_grad(loss_fn)(net)
    optimizer.update(net, grads)
    logits = net(graph, graph.nodes)
    assert np.isfinite(float(loss)) and logits.shape == (n, classes)
    assert np.all(np.isfinite(logits))
    after_step = jax.tree.map(np.asarray, nnx.state(net.blocks[0].extra, nnx.Param))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after_step)))


def test_ganet_residual_skip_sums_the_modules(rng):
    """skip="add": the GCN output plus each module's ELU output, one [N, hidden] stream (in
    eval mode: no dropout), into the output GCN; modules of another width are refused."""
    from models.graph_training import DenseAttentionNet

    n, features, classes, hidden = 7, 6, 3, 8
    graph = jg.add_self_loops(ring(rng, n=n, features=features))

    def make(width, rngs):
        return HardGraphAttention(width, 4, num_heads=2, k=2, rngs=rngs), 8

    net = DenseAttentionNet(features, classes, make, hidden=hidden, num_modules=2, dropout=0.5,
                            skip="add", rngs=nnx.Rngs(params=0, dropout=1))  # fmt: skip
    net.eval()
    h = jax.nn.elu(net.gcn_in(graph, graph.nodes).nodes)
    for module in net.blocks:
        h = h + jax.nn.elu(module(graph._replace(nodes=h)).nodes)
    want = net.gcn_out(graph._replace(nodes=h)).nodes
    np.testing.assert_allclose(net(graph, graph.nodes), want, rtol=1e-5, atol=1e-5)
    assert net.gcn_out.linear.kernel.shape[0] == hidden  # no concatenation
    with pytest.raises(ValueError, match="skip='add' needs modules of 8 features, got 5"):
        DenseAttentionNet(features, classes, lambda w, r: (make(w, r)[0], 5), hidden=hidden,
                          num_modules=1, dropout=0.5, skip="add", rngs=nnx.Rngs(0))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Planetoid


@needs_data
@pytest.mark.parametrize(
    "name,nodes,features,classes,train,edges",
    [("cora", 2708, 1433, 7, 140, 10556), ("citeseer", 3327, 3703, 6, 120, 9104)],
)
def test_planetoid_standard_split(name, nodes, features, classes, train, edges):
    data = planetoid.load_planetoid(name)
    g = data.graph
    assert g.nodes.shape == (nodes, features) and data.num_classes == classes
    assert (data.train_mask.sum(), data.val_mask.sum(), data.test_mask.sum()) == (train, 500, 1000)
    assert (
        not (data.train_mask & data.val_mask).any() and not (data.val_mask & data.test_mask).any()
    )
    assert g.senders.shape == (edges,)  # the usual counts (PyG's Planetoid: 10556 / 9104)
    pairs = set(zip(g.senders.tolist(), g.receivers.tolist(), strict=True))
    assert all((r, s) in pairs for s, r in pairs) and all(s != r for s, r in pairs)
    assert np.all(data.labels[data.train_mask | data.val_mask | data.test_mask] >= 0)
    np.testing.assert_allclose(g.nodes.sum(1)[g.nodes.sum(1) > 0], 1.0, rtol=1e-5)


def test_safe_unpickler_refuses_other_classes():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        planetoid.safe_load(pickle.dumps(Evil(), protocol=2))
    graph = collections.defaultdict(list, {0: [1, 2], 3: [0]})  # what ind.*.graph holds
    assert planetoid.safe_load(pickle.dumps(graph, protocol=2)) == graph


# ------------------------------------------------------------------------------------------------
# Training scripts


@needs_data
@pytest.mark.parametrize(
    "module,extra",
    [
        ("gat", []),
        ("hganet", ["--modules", "1", "--k", "4"]),
        ("hganet", ["--modules", "1", "--k", "4", "--gam", "gcn", "--gam-features", "16"]),
        ("hganet", ["--modules", "1", "--k", "4", "--gam", "gcn-first"]),
        ("hganet", ["--modules", "1", "--k", "4", "--skip", "add"]),
        ("hganet", ["--architecture", "gat", "--heads", "2"]),
        ("hganet", ["--architecture", "gat", "--heads", "2", "--score", "additive", "--match-dgl"]),
        ("cganet", ["--modules", "1", "--normalize"]),
    ],
)
def test_training_script_prints_json_metrics(capsys, module, extra):
    script = __import__(f"models.{module}", fromlist=["main"])
    script.main(["--dataset", "cora", "--seed", "1", "--epochs", "4", "--no-progress", *extra])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert {"test_accuracy", "val_accuracy", "epochs", "seconds"} <= set(result)
    assert result["epochs"] == 4 and 0 <= result["test_accuracy"] <= 100
    assert result["model"] == module


def test_sparse_features_match_dense(rng):
    from models.graph_training import SparseFeatures

    x = rng.standard_normal((7, 5)) * (rng.random((7, 5)) < 0.3)
    kernel = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    sparse = SparseFeatures.from_dense(x.astype(np.float32))
    np.testing.assert_allclose(sparse.matmul(kernel), x @ np.asarray(kernel), rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(sparse)  # a pytree: passes through jit
