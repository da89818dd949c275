"""Shape buckets, the registry of tunable kernels, and the JSON files that hold tuned configs.

A tuned config is found by its bucket: (implementation, device kind, head dim padded to a power
of two >= 16, dtype, causal, length range of max(T, S)). `lookup` tries the user's cache file,
then the tables shipped inside the package, and returns None when neither has the bucket (the
kernel then uses its heuristic); a float16 bucket that no source holds takes bfloat16's
(`SIBLING_DTYPES`). A file that cannot be read, is not a jattn autotune file, has
another format version, or holds an entry whose config does not validate is skipped with one
`AutotuneCacheWarning`: a cache never breaks a call. That includes a path that is not a regular
file (a FIFO or a device is never opened for reading, so a lookup cannot block), JSON nested too
deeply to parse, and configs holding NaN, infinities or values of the wrong type. Writers
(`merge`, so `jattn autotune`) hold an advisory lock (`fcntl.flock` on `<cache>.lock`) around
read-merge-rename, so concurrent tuners keep each other's entries.
"""

import contextlib
import dataclasses
import functools
import importlib.resources
import json
import math
import os
import pathlib
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: writers go unlocked
    fcntl = None

FORMAT = "jattn-autotune"
VERSION = 1
CACHE_ENV = "JATTN_AUTOTUNE_CACHE"  # path of the user's cache file
ENABLE_ENV = "JATTN_AUTOTUNE"  # "0" / "off" / "false" / "no": heuristics only, no file is read
LENGTH_BOUNDS = (1024, 4096)  # length ranges of max(T, S): <=1024, <=4096, >4096
LENGTH_RANGES = tuple(f"<={b}" for b in LENGTH_BOUNDS) + (f">{LENGTH_BOUNDS[-1]}",)
MODES = ("forward", "forward+backward")
_DTYPES = ("float16", "bfloat16", "float32")
_TABLES = "tables"  # folder of the shipped tables, inside this package


class AutotuneCacheWarning(UserWarning):
    """A cache file or entry was unusable and was skipped (the call falls back to defaults)."""


# --- buckets ------------------------------------------------------------------------------------


def length_range(length: int) -> str:
    """The length range that max(T, S) falls in.

    >>> length_range(512), length_range(4096), length_range(4097)
    ('<=1024', '<=4096', '>4096')
    """
    for bound, name in zip(LENGTH_BOUNDS, LENGTH_RANGES, strict=False):
        if length <= bound:
            return name
    return LENGTH_RANGES[-1]


def bucket_head_dim(head_dim: int) -> int:
    """The head dim a bucket is keyed by: the next power of two, at least 16 (what the kernels
    pad to), so H = 80 and H = 128 share a config."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def normalize_device_kind(kind: str) -> str:
    """`jax.Device.device_kind` as a file-friendly key: 'NVIDIA H100 80GB HBM3' ->
    'nvidia_h100_80gb_hbm3'."""
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def device_kind() -> str:
    """The normalized kind of the default device (what lookups and `tune` key buckets by)."""
    return normalize_device_kind(jax.devices()[0].device_kind)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bucket:
    """The shapes one tuned config serves.

    implementation: the registered kernel ('triton', ...); device: normalized device kind;
    head_dim: H padded to a power of two >= 16; dtype: 'bfloat16', 'float16' or 'float32';
    causal: `is_causal`; lengths: the range of max(T, S), one of `LENGTH_RANGES`.
    """

    implementation: str
    device: str
    head_dim: int
    dtype: str
    causal: bool
    lengths: str

    def __post_init__(self):
        if not isinstance(self.implementation, str) or not self.implementation:
            raise ValueError(f"implementation must be a name, got {self.implementation!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a device kind, got {self.device!r}")
        if (
            not isinstance(self.head_dim, int)
            or isinstance(self.head_dim, bool)
            or self.head_dim != bucket_head_dim(self.head_dim)
        ):
            raise ValueError(f"head_dim must be a power of two >= 16, got {self.head_dim!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")
        if self.lengths not in LENGTH_RANGES:
            raise ValueError(f"lengths must be one of {LENGTH_RANGES}, got {self.lengths!r}")

    def __str__(self) -> str:
        causal = "causal" if self.causal else "full"
        return (
            f"{self.implementation} {self.device} H={self.head_dim} {self.dtype} {causal} "
            f"T{self.lengths}"
        )


def bucket_for(
    implementation: str,
    *,
    head_dim: int,
    dtype,
    causal: bool,
    length: int,
    device: str | None = None,
) -> Bucket:
    """The bucket of a call: head dim H, input dtype, `is_causal` and length max(T, S), on
    `device` (a normalized device kind; default: this machine's)."""
    return Bucket(
        implementation=implementation,
        device=device_kind() if device is None else device,
        head_dim=bucket_head_dim(head_dim),
        dtype=np.dtype(dtype).name,
        causal=bool(causal),
        lengths=length_range(int(length)),
    )


# --- the registry of tunable kernels ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Search:
    """One stage of a kernel's search: candidates derived from the best config so far, timed in
    `mode` ('forward': the forward alone; 'forward+backward': value and gradients).

    candidates: (bucket, base config) -> configs to time (the base is always timed too);
    a candidate whose construction raises ValueError is dropped.
    """

    name: str
    mode: str
    candidates: Callable[[Bucket, Any], Sequence[Any]]

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


# (bucket, config, mode, (batch, length, heads)) -> a no-argument callable to time
Runner = Callable[[Bucket, Any, str, tuple[int, int, int]], Callable[[], Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tunable:
    """A kernel `jattn.autotune` can tune: see `register_tunable`."""

    name: str
    config_type: type
    default: Callable[[Bucket], Any]
    searches: tuple[Search, ...]
    run: Runner | None = None


_TUNABLES: dict[str, Tunable] = {}


def register_tunable(
    name: str,
    config_type: type,
    *,
    default: Callable[[Bucket], Any],
    searches: Sequence[Search],
    run: Runner | None = None,
) -> Tunable:
    """Make the kernel behind `implementation=name` tunable.

    Args:
      name: the implementation name of `jattn.dot_product_attention`.
      config_type: its frozen config dataclass; cache entries are rebuilt with
        `config_type(**fields)`, so its constructor must validate (raise ValueError or TypeError).
      default: bucket -> the heuristic config (the start of the search).
      searches: the stages of the search, run in order; each starts from the best config of the
        stages before (tuning the forward fields, then the backward fields, for example).
      run: (bucket, config, mode, (batch, length, heads)) -> a callable to time; default:
        `jattn.dot_product_attention(..., implementation=name, config=config)` on random inputs
        `[batch, length, heads, bucket.head_dim]`, jitted, forward or value-and-gradients.
    """
    if not searches:
        raise ValueError(f"{name}: give at least one Search")
    tunable = Tunable(
        name=name, config_type=config_type, default=default, searches=tuple(searches), run=run
    )
    _TUNABLES[name] = tunable
    return tunable


def tunables() -> dict[str, Tunable]:
    """The registered tunable kernels, by implementation name."""
    return dict(_TUNABLES)


def get_tunable(name: str) -> Tunable:
    if name not in _TUNABLES:
        raise ValueError(f"{name!r} is not tunable; tunable implementations: {sorted(_TUNABLES)}")
    return _TUNABLES[name]


# --- files --------------------------------------------------------------------------------------


def cache_path() -> pathlib.Path:
    """The user's cache file: $JATTN_AUTOTUNE_CACHE, else $XDG_CACHE_HOME/jattn/autotune.json,
    else ~/.cache/jattn/autotune.json."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return pathlib.Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jattn" / "autotune.json"


def enabled() -> bool:
    """False when $JATTN_AUTOTUNE is 0/off/false/no: `config=None` then uses heuristics only."""
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tuned config as stored: its bucket, the config's fields, and what was measured."""

    bucket: Bucket
    config: dict[str, Any]
    ms: dict[str, float] = dataclasses.field(default_factory=dict)
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(
            dataclasses.asdict(self.bucket), config=self.config, ms=self.ms, measured=self.measured
        )


_WARNED: set[tuple] = set()
_LOADED: dict[str, tuple[tuple, dict[Bucket, Entry]]] = {}
_BUILT: dict[tuple, Any] = {}  # (file stamp, bucket) -> validated config (or None: invalid)


def _warn_once(key: tuple, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, AutotuneCacheWarning, stacklevel=3)


def _parse(text: str, source: str, stamp: tuple) -> dict[Bucket, Entry]:
    """The entries of a file's text; a file-level problem warns once and gives no entries."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        _warn_once((source, stamp), f"{source}: not valid JSON ({e!r:.200}); ignoring it")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        _warn_once((source, stamp), f"{source}: not a jattn autotune file; ignoring it")
        return {}
    if data.get("version") != VERSION:
        _warn_once(
            (source, stamp),
            f"{source}: format version {data.get('version')!r}, this jattn reads {VERSION}; "
            "ignoring it (run `jattn autotune` again)",
        )
        return {}
    entries = {}
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        _warn_once((source, stamp), f"{source}: 'entries' is not a list; ignoring the file")
        return {}
    for i, raw in enumerate(raw_entries):
        try:
            fields = {f.name: raw[f.name] for f in dataclasses.fields(Bucket)}
            bucket = Bucket(**fields)
            if not isinstance(raw["config"], dict):
                raise ValueError("'config' is not an object")
            for name, value in raw["config"].items():
                # None (JSON null) is an optional field left unset, e.g. bwd_dkdv_stages.
                if not isinstance(value, str | bool | int | float | None) or (
                    isinstance(value, float) and not math.isfinite(value)
                ):
                    raise ValueError(
                        f"config field {name!r} = {value!r} is not a finite scalar or null"
                    )
            entries[bucket] = Entry(
                bucket, dict(raw["config"]), dict(raw.get("ms", {})), dict(raw.get("measured", {}))
            )
        except (KeyError, TypeError, ValueError) as e:
            _warn_once((source, stamp, i), f"{source}: entry {i} is unusable ({e!r}); skipping it")
    return entries


def _stamp(path: pathlib.Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, stat.S_ISREG(st.st_mode))


def _read_regular(path: pathlib.Path) -> str:
    """The text of a regular file. Opened non-blocking and checked with fstat before reading, so
    a FIFO (or a file swapped for one since the stat) raises OSError instead of blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read().decode()
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> dict[Bucket, Entry]:
    """The entries of a cache file, memoized until the file changes; {} for a missing file, and
    {} with an `AutotuneCacheWarning` for one that is unreadable, foreign or of another version."""
    path = pathlib.Path(path)
    stamp = _stamp(path)
    if stamp is None:
        return {}
    key = str(path)
    if key in _LOADED and _LOADED[key][0] == stamp:
        return _LOADED[key][1]
    try:
        if not stamp[-1]:
            raise OSError("not a regular file")
        text = _read_regular(path)
    except (OSError, UnicodeDecodeError) as e:
        _warn_once((key, stamp), f"{path}: cannot be read ({e}); ignoring it")
        entries = {}
    else:
        entries = _parse(text, key, stamp)
    _LOADED[key] = (stamp, entries)
    return entries


def save(path: str | os.PathLike, entries: Sequence[Entry]) -> None:
    """Write entries to a cache file atomically (a temporary file in the same folder, renamed
    over the old one), so a reader never sees half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_file():
        raise OSError(f"{path} exists and is not a regular file; not replacing it")
    record = dict(format=FORMAT, version=VERSION, entries=[e.to_json() for e in entries])
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    _LOADED.pop(str(path), None)


def check_writable(path: str | os.PathLike) -> None:
    """Raise OSError now if the cache at `path` could not be written (its folder cannot be made
    or written, or the path is not a regular file): before hours of tuning, not after."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_file():
        raise OSError(f"{path} exists and is not a regular file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """An exclusive advisory lock on `<path>.lock` (created beside the cache) for the duration:
    read-merge-rename by two processes at once would otherwise lose one's entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def merge(path: str | os.PathLike, new: Sequence[Entry]) -> None:
    """Add or replace entries in a cache file (an unusable old file is replaced, with a warning
    from `load`). Holds the file's lock from the read to the rename, so concurrent merges (two
    tuners at once) keep every entry."""
    path = pathlib.Path(path)
    with _locked(path):
        _LOADED.pop(str(path), None)  # read what is on disk now, not a memo
        entries = dict(load(path))
        entries.update({e.bucket: e for e in new})
        save(path, list(entries.values()))


@functools.cache
def shipped_tables() -> tuple[pathlib.Path, ...]:
    """The tables inside the package (`jattn/autotune/tables/*.json`), in name order."""
    folder = importlib.resources.files(__package__) / _TABLES
    return tuple(
        sorted(
            pathlib.Path(str(p))
            for p in folder.iterdir()
            if p.name.endswith(".json") and p.is_file()
        )
    )


def _check_field_types(config_type: type, fields: dict[str, Any]) -> None:
    """A stored value must have the type of its field's default: an int field takes an int (not
    a float, not a bool), a bool field a bool, a float field a finite number."""
    if not dataclasses.is_dataclass(config_type):
        return
    for f in dataclasses.fields(config_type):
        if f.name not in fields or f.default is dataclasses.MISSING:
            continue
        value, default = fields[f.name], f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        else:
            continue
        if not ok:
            raise ValueError(f"{f.name} = {value!r} is not a {type(default).__name__}")


def _config_from(entry: Entry, source: str, stamp: tuple) -> Any:
    """The entry's config rebuilt and validated by its kernel's config type, or None (warned)."""
    key = (source, stamp, entry.bucket)
    if key not in _BUILT:
        tunable = _TUNABLES.get(entry.bucket.implementation)
        if tunable is None:
            return None  # not registered now; the entry stays for when it is
        try:
            _check_field_types(tunable.config_type, entry.config)
            _BUILT[key] = tunable.config_type(**entry.config)
        except (TypeError, ValueError) as e:
            _warn_once(key, f"{source}: the config for {entry.bucket} is invalid ({e}); ignored")
            _BUILT[key] = None
    return _BUILT[key]


def _sources() -> list[tuple[str, pathlib.Path]]:
    return [("cache", cache_path())] + [("shipped", p) for p in shipped_tables()]


def state() -> tuple:
    """A hashable token that changes whenever a lookup could answer differently: whether
    lookups are on, and the stamp of every source file. Whoever caches compiled functions
    built with `config=None` keys them on it (`jattn.attention`'s per-signature jit)."""
    if not enabled():
        return (False,)
    return (True, *((str(path), _stamp(path)) for _, path in _sources()))


# A dtype without entries of its own takes those of a dtype that runs the same tiles at the same
# rate: float16 and bfloat16 are both 2-byte floats, with one wgmma / mma rate and one
# shared-memory layout. On the H200 (stop 37, benchmarks/NOTES.md) the float16 mosaic forward at
# H = 128 took 6-12% less time on bfloat16's tuned tiles than on the heuristic's, and the float16
# runs ranked cuDNN and mosaic as the bfloat16 dispatch table does in all 10 cells measured.
SIBLING_DTYPES = {"float16": "bfloat16"}


def lookup_bucket(bucket: Bucket) -> tuple[Any, str] | None:
    """(config, 'cache' or 'shipped') for a bucket, or None: nothing usable stored (or lookups
    are off through $JATTN_AUTOTUNE). A float16 bucket without entries takes bfloat16's
    (`SIBLING_DTYPES`), after every source was searched for its own; the source then says so:
    'cache (bfloat16)' or 'shipped (bfloat16)'."""
    if not enabled():
        return None
    found = _lookup_exact(bucket)
    sibling = SIBLING_DTYPES.get(bucket.dtype)
    if found is None and sibling is not None:
        found = _lookup_exact(dataclasses.replace(bucket, dtype=sibling))
        if found is not None:
            found = (found[0], f"{found[1]} ({sibling})")
    return found


def _lookup_exact(bucket: Bucket) -> tuple[Any, str] | None:
    for kind, path in _sources():
        entries = load(path)
        entry = entries.get(bucket)
        if entry is not None:
            config = _config_from(entry, str(path), _LOADED[str(path)][0])
            if config is not None:
                return config, kind
    return None


def lookup(
    implementation: str,
    *,
    head_dim: int,
    dtype,
    causal: bool,
    length: int,
    device: str | None = None,
) -> Any:
    """The stored config for a call's bucket (user cache, then shipped tables), or None.

    Kernels call this at trace time when `config=None` (static shapes only); None means "use
    your heuristic". Files are re-read only when they change. A call no bucket can hold (float64,
    say: the kernel declines it itself) gets None.
    """
    try:
        bucket = bucket_for(
            implementation,
            head_dim=head_dim,
            dtype=dtype,
            causal=causal,
            length=length,
            device=device,
        )
    except ValueError:
        return None
    found = lookup_bucket(bucket)
    return None if found is None else found[0]


def lookup_call(implementation: str, query, key, *, causal: bool) -> Any:
    """`lookup` for a call's query [B, T, N, H] and key [B, S, K, H] (length: max(T, S))."""
    return lookup(
        implementation,
        head_dim=query.shape[-1],
        dtype=query.dtype,
        causal=causal,
        length=max(query.shape[1], key.shape[1]),
    )


def resolve(bucket: Bucket) -> tuple[Any, str]:
    """(config, source) that `config=None` gets for a bucket: source is 'cache', 'shipped' or
    'default' (the kernel's registered heuristic); 'cache (bfloat16)' or 'shipped (bfloat16)'
    where a float16 bucket took bfloat16's entry (`lookup_bucket`)."""
    found = lookup_bucket(bucket)
    if found is not None:
        return found
    return get_tunable(bucket.implementation).default(bucket), "default"
