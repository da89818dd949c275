"""`jattn.autotune`: kernel configs tuned to the GPU the library runs on.

`jattn.dot_product_attention(..., config=None)` asks this package for the config of the call's
bucket (implementation, device kind, head dim padded to a power of two, dtype, causal, length
range of max(T, S): <=1024, <=4096, >4096), at trace time, from static shapes:

1. the user's cache: $JATTN_AUTOTUNE_CACHE, else $XDG_CACHE_HOME/jattn/autotune.json, else
   ~/.cache/jattn/autotune.json (written by `tune` / `jattn autotune`);
2. the tables shipped in the package (`tables/*.json`; one per measured device kind);
3. the kernel's heuristic.

An explicit `config=` always wins; $JATTN_AUTOTUNE=0 turns lookups off (heuristics only). A
corrupt, foreign or other-version file, or an entry whose config does not validate, is skipped
with one `AutotuneCacheWarning`: never an error.

Kernels register themselves with `register_tunable` (config type, heuristic default, search
stages); `tune` times every candidate on the device (median after warm-up, tqdm progress bar),
skips candidates that fail to compile, and merges the winners into the cache file atomically.
"""

from jattn.autotune.cache import CACHE_ENV as CACHE_ENV
from jattn.autotune.cache import ENABLE_ENV as ENABLE_ENV
from jattn.autotune.cache import LENGTH_RANGES as LENGTH_RANGES
from jattn.autotune.cache import AutotuneCacheWarning as AutotuneCacheWarning
from jattn.autotune.cache import Bucket as Bucket
from jattn.autotune.cache import Entry as Entry
from jattn.autotune.cache import Search as Search
from jattn.autotune.cache import Tunable as Tunable
from jattn.autotune.cache import bucket_for as bucket_for
from jattn.autotune.cache import cache_path as cache_path
from jattn.autotune.cache import device_kind as device_kind
from jattn.autotune.cache import enabled as enabled
from jattn.autotune.cache import load as load
from jattn.autotune.cache import lookup as lookup
from jattn.autotune.cache import lookup_call as lookup_call
from jattn.autotune.cache import register_tunable as register_tunable
from jattn.autotune.cache import resolve as resolve
from jattn.autotune.cache import save as save
from jattn.autotune.cache import shipped_tables as shipped_tables
from jattn.autotune.cache import tunables as tunables
from jattn.autotune.tuner import Plan as Plan
from jattn.autotune.tuner import Result as Result
from jattn.autotune.tuner import plan as plan
from jattn.autotune.tuner import tune as tune

__all__ = [
    "CACHE_ENV",
    "ENABLE_ENV",
    "LENGTH_RANGES",
    "AutotuneCacheWarning",
    "Bucket",
    "Entry",
    "Plan",
    "Result",
    "Search",
    "Tunable",
    "bucket_for",
    "cache_path",
    "device_kind",
    "enabled",
    "load",
    "lookup",
    "lookup_call",
    "plan",
    "register_tunable",
    "resolve",
    "save",
    "shipped_tables",
    "tunables",
    "tune",
]
