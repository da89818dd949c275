"""Text for the example language models, with no download: the Python standard library's sources.

Tokens are bytes (vocabulary 256), so any text file works and nothing needs a tokenizer. The
default corpus is every `.py` file under this interpreter's standard library (`sysconfig`'s
`stdlib` path, tests and site-packages excluded), read in sorted order; pass your own files or
directories instead (the training scripts' `--text PATH ...`). Files are split into train and
validation by a hash of their path, so the split does not move when the corpus grows.

Batches are a pure function of (seed, step): a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

import dataclasses
import hashlib
import pathlib
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np

VOCAB_SIZE = 256  # bytes
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def stdlib_sources() -> list[pathlib.Path]:
    """The `.py` files of this interpreter's standard library, sorted (tests excluded)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"no .py sources under the standard library at {root}")
    return sorted(files)


def expand_paths(paths: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
    """Files as given, and the files under each directory (recursively, sorted; hidden and
    `__pycache__` entries skipped)."""
    files = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and not any(
                        part.startswith(".") or part == "__pycache__"
                        for part in p.relative_to(path).parts
                    )
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    if not files:
        raise FileNotFoundError(f"no files under {list(map(str, paths))}")
    return files


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    train: np.ndarray  # uint8 [n_train]
    valid: np.ndarray  # uint8 [n_valid]
    num_files: int

    def batch(self, split: str, seed: int, step: int, batch_size: int, length: int) -> np.ndarray:
        """`[batch_size, length + 1]` int32 windows (inputs, shifted targets) from (seed, step)."""
        data = self.train if split == "train" else self.valid
        if len(data) <= length + 1:
            raise ValueError(f"the {split} split has {len(data)} bytes; need > {length + 1}")
        rng = np.random.default_rng([seed, step, split == "train"])
        starts = rng.integers(0, len(data) - length - 1, size=batch_size)
        return np.stack([data[s : s + length + 1] for s in starts]).astype(np.int32)


def load_corpus(
    paths: Sequence[str | pathlib.Path] | None = None,
    *,
    max_bytes: int | None = 8_000_000,
    valid_fraction: float = 0.05,
) -> TextCorpus:
    """Read files (default: the standard library's sources) into byte-token train/valid splits.

    `max_bytes` caps the total (files are taken in order until it is reached); files are
    assigned to validation when the hash of their path falls in the first `valid_fraction`.
    """
    files = stdlib_sources() if not paths else expand_paths(paths)
    train, valid, total, num_files = [], [], 0, 0
    for path in files:
        data = path.read_bytes()
        if max_bytes is not None and total + len(data) > max_bytes and total:
            break
        total += len(data)
        num_files += 1
        digest = hashlib.sha256(str(path.name).encode() + str(len(data)).encode()).digest()
        in_valid = int.from_bytes(digest[:4], "little") / 2**32 < valid_fraction
        (valid if in_valid else train).append(data)
    if not valid:  # tiny corpora (one user file): hold out its tail
        joined = b"".join(train)
        cut = int(len(joined) * (1 - valid_fraction))
        train, valid = [joined[:cut]], [joined[cut:]]
    as_array = lambda chunks: np.frombuffer(b"\n".join(chunks), np.uint8)
    return TextCorpus(as_array(train), as_array(valid), num_files)


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens: Iterable[int]) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")
