"""Planetoid citation graphs (Cora, Citeseer) with the standard split, as a `jraph.GraphsTuple`.

Reads the `ind.<name>.*` files of the Planetoid benchmark (Yang et al., ICML 2016; the public
split files of github.com/kimiyoung/planetoid, folder `data/`) the way the GCN and GAT reference
loaders do: 140 (Cora) / 120 (Citeseer) training nodes, 500 validation nodes,
1000 test nodes; test rows reordered by the sorted test index; Citeseer's isolated test nodes get
zero features and no label; features row-normalised; the graph made undirected, without duplicate
edges or self-loops (models add self-loops where they need them).

The pickles are opened with an Unpickler that resolves only the numpy/scipy/builtin names these
files use and refuses everything else (pickle would otherwise run arbitrary code).
"""

import collections
import dataclasses
import io
import os
import pathlib
import pickle

import jraph
import numpy as np
import scipy.sparse as sp

DATASETS = ("cora", "citeseer")
PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index")
SOURCE = "https://github.com/kimiyoung/planetoid/tree/master/data"  # the public split files
DATA_DIR_ENV = "JATTN_PLANETOID_DIR"
NUM_VALIDATION = 500


def default_data_dir() -> pathlib.Path:
    """$JATTN_PLANETOID_DIR if set, else ./data/planetoid, else a `planetoid` data folder beside
    the checkout (`../shared/data/planetoid`, where the development machines keep it)."""
    if os.environ.get(DATA_DIR_ENV):
        return pathlib.Path(os.environ[DATA_DIR_ENV])
    here = pathlib.Path("data") / "planetoid"
    beside = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "planetoid"
    return here if here.is_dir() or not beside.is_dir() else beside


DEFAULT_DATA_DIR = default_data_dir()

# (module, name) as written in the Python 2 pickles -> the object to build.
_ALLOWED = {
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
    ("scipy.sparse.csr", "csr_matrix"): sp.csr_matrix,
    ("scipy.sparse._csr", "csr_matrix"): sp.csr_matrix,
    ("__builtin__", "list"): list,
    ("builtins", "list"): list,
    ("collections", "defaultdict"): collections.defaultdict,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: not one of the numpy/scipy classes "
                "the Planetoid files need"
            ) from None


def safe_load(data: bytes):
    """Unpickles Planetoid data (Python 2 pickles, latin1) admitting only `_ALLOWED` names."""
    return _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()


@dataclasses.dataclass(frozen=True)
class Planetoid:
    """One Planetoid dataset: a single-graph `GraphsTuple` (nodes = features) and the split."""

    name: str
    graph: jraph.GraphsTuple  # nodes [N, F] float32, senders/receivers [E] int32 (undirected)
    labels: np.ndarray  # [N] int32 (-1: no label)
    train_mask: np.ndarray  # [N] bool
    val_mask: np.ndarray  # [N] bool
    test_mask: np.ndarray  # [N] bool

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def num_features(self) -> int:
        return int(self.graph.nodes.shape[1])


def load_planetoid(name: str, data_dir: str | pathlib.Path | None = None) -> Planetoid:
    """Loads `name` ('cora' or 'citeseer') from `data_dir` (default: `default_data_dir()`).

    Raises FileNotFoundError saying where to get the files when the folder or one of them is
    missing."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    root = pathlib.Path(default_data_dir() if data_dir is None else data_dir)
    missing = [
        f"ind.{name}.{part}" for part in PARTS if not (root / f"ind.{name}.{part}").is_file()
    ]
    if missing:
        where = "does not exist" if not root.is_dir() else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(
            f"Planetoid data folder {root} {where}. Download the {name} split files "
            f"ind.{name}.{{{','.join(PARTS)}}} from {SOURCE} into a folder and pass "
            f"--data-dir FOLDER (or set ${DATA_DIR_ENV})"
        )
    parts = {
        part: safe_load((root / f"ind.{name}.{part}").read_bytes())
        for part in ("x", "y", "tx", "ty", "allx", "ally", "graph")
    }
    test_index = np.array(
        [int(line) for line in (root / f"ind.{name}.test.index").read_text().split()], np.int64
    )
    test_sorted = np.sort(test_index)
    tx, ty = parts["tx"], parts["ty"]
    if name == "citeseer":
        # Isolated test nodes are missing from tx/ty: give them zero rows (the GCN loader's fix).
        full = np.arange(test_sorted[0], test_sorted[-1] + 1)
        tx_full = sp.lil_matrix((len(full), tx.shape[1]), dtype=np.float32)
        tx_full[test_sorted - test_sorted[0], :] = tx
        ty_full = np.zeros((len(full), ty.shape[1]), ty.dtype)
        ty_full[test_sorted - test_sorted[0], :] = ty
        tx, ty = tx_full, ty_full
    features = sp.vstack((parts["allx"], tx)).tolil()
    features[test_index, :] = features[test_sorted, :]
    onehot = np.vstack((parts["ally"], ty))
    onehot[test_index, :] = onehot[test_sorted, :]
    labels = np.where(onehot.sum(1) > 0, onehot.argmax(1), -1).astype(np.int32)

    features = np.asarray(features.todense(), np.float32)
    row_sum = features.sum(1, keepdims=True)
    features = features / np.where(row_sum > 0, row_sum, 1.0)

    num_nodes = features.shape[0]
    pairs = [(i, j) for i, nbrs in parts["graph"].items() for j in nbrs if i != j]
    pairs = np.array(pairs, np.int64).reshape(-1, 2)
    if pairs.size and pairs.max() >= num_nodes:
        raise ValueError(f"{name}: edge to node {pairs.max()} but only {num_nodes} nodes")
    both = np.concatenate([pairs, pairs[:, ::-1]])
    both = np.unique(both[:, 0] * num_nodes + both[:, 1])
    senders, receivers = (both // num_nodes).astype(np.int32), (both % num_nodes).astype(np.int32)

    def mask(index):
        m = np.zeros(num_nodes, bool)
        m[index] = True
        return m

    num_train = parts["y"].shape[0]
    graph = jraph.GraphsTuple(
        nodes=features,
        edges=None,
        globals=None,
        senders=senders,
        receivers=receivers,
        n_node=np.array([num_nodes], np.int32),
        n_edge=np.array([len(senders)], np.int32),
    )
    return Planetoid(
        name=name,
        graph=graph,
        labels=labels,
        train_mask=mask(np.arange(num_train)),
        val_mask=mask(np.arange(num_train, num_train + NUM_VALIDATION)),
        test_mask=mask(test_sorted),
    )
