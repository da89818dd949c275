"""`tune`: time each kernel's candidate configs on this GPU, per bucket, and store the winners."""

import dataclasses
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jattn.autotune import cache

TOKENS, HIDDEN = 16384, 2048  # FlashAttention's benchmark shapes: batch = 16k // T, N = 2048 // H
DEFAULT_LENGTHS = (1024, 4096, 16384)  # one per length range
DEFAULT_HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `tune` would time for one bucket: the problem shape, the start config and, per
    search, the candidates (the start of each search is the winner of the one before)."""

    bucket: cache.Bucket
    problem: tuple[int, int, int]  # (batch, length, heads), T = S = length
    default: Any
    candidates: dict[str, list[Any]]  # search name -> candidates from the default config


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome for one bucket: the winning config, the best and the default's median ms per
    search, and a note per candidate that was skipped (failed to build, compile or run)."""

    bucket: cache.Bucket
    config: Any
    ms: dict[str, float]
    default_ms: dict[str, float]
    skipped: list[str]


def time_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median ms per call of fn(): a warm-up (which compiles), then `repeats` timings of a batch
    of calls long enough (~20 ms) that launch overhead and timer resolution do not dominate."""
    return time_ms_rounds({0: fn}, repeats, record_errors=False)[0]


def time_ms_rounds(
    fns: dict[Any, Callable[[], Any]], repeats: int = 5, *, record_errors: bool = True
) -> dict[Any, float | str]:
    """`time_ms` of several functions timed in rounds: each round takes one timing of every
    fn, so that a drift of the GPU's clocks or temperature moves them alike (on the H200 the
    same cell moved 5-8% between runs). A fn that fails to compile or run gets its error
    message ("Type: first line") instead of a time, or with record_errors=False raises."""
    inner, results = {}, {}
    for name, fn in fns.items():
        try:
            jax.block_until_ready(fn())
            start = time.perf_counter()
            jax.block_until_ready(fn())
            inner[name] = max(1, min(100, int(0.02 / max(time.perf_counter() - start, 1e-6))))
        except Exception as e:
            if not record_errors:
                raise
            results[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    times = {name: [] for name in inner}
    for _ in range(repeats):
        for name, calls in inner.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fns[name]()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) * 1e3 / calls)
    results |= {name: statistics.median(samples) for name, samples in times.items()}
    return {name: results[name] for name in fns}


def default_run(
    bucket: cache.Bucket, config: Any, mode: str, problem: tuple[int, int, int]
) -> Callable[[], Any]:
    """`jattn.dot_product_attention` with `implementation=bucket.implementation` and `config` on
    random inputs `[batch, length, heads, bucket.head_dim]` (T = S), jitted; 'forward+backward'
    returns the gradients of sum(out) in q, k and v."""
    from jattn.attention import dot_product_attention  # jattn imports this package

    batch, length, heads = problem
    shape = (batch, length, heads, bucket.head_dim)
    keys = jax.random.split(jax.random.key(bucket.head_dim * 7919 + length), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.dtype(bucket.dtype)) for key in keys)

    def attend(q, k, v):
        return dot_product_attention(
            q, k, v, is_causal=bucket.causal, implementation=bucket.implementation, config=config
        )

    if mode == "forward":
        fn = jax.jit(attend)
    else:
        loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda: fn(q, k, v)


def _candidates(tunable: cache.Tunable, search: cache.Search, bucket, base) -> list[Any]:
    """The base config first, then the search's candidates, without duplicates."""
    found = [base]
    for config in search.candidates(bucket, base):
        if config not in found:
            found.append(config)
    return found


def plan(
    implementation: str = "triton",
    *,
    head_dims: Sequence[int] = DEFAULT_HEAD_DIMS,
    dtypes: Sequence[str] = ("bfloat16",),
    causal: Sequence[bool] = (False, True),
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    tokens: int = TOKENS,
    hidden: int = HIDDEN,
    searches: Sequence[str] | None = None,
    device: str | None = None,
) -> list[Plan]:
    """The search space `tune` would time, bucket by bucket (nothing is run).

    Raises ValueError for an implementation that is not tunable, an unknown search, two lengths
    in one length range, or a head dim that does not divide `hidden`.
    """
    tunable = cache.get_tunable(implementation)
    names = [s.name for s in tunable.searches]
    unknown = sorted(set(searches or ()) - set(names))
    if unknown:
        raise ValueError(f"{implementation}: unknown searches {unknown}; it has {names}")
    chosen = [s for s in tunable.searches if searches is None or s.name in searches]
    ranges = {}
    for length in lengths:
        if length < 1:
            raise ValueError(f"lengths must be positive, got {length}")
        other = ranges.setdefault(cache.length_range(length), length)
        if other != length:
            raise ValueError(
                f"lengths {other} and {length} fall in one length range "
                f"({cache.length_range(length)}); give one per range of {cache.LENGTH_RANGES}"
            )
    device = cache.device_kind() if device is None else device
    plans = []
    for head_dim in head_dims:
        if head_dim < 1 or hidden % head_dim:
            raise ValueError(f"head dim {head_dim} must divide hidden={hidden}")
        for dtype in dtypes:
            for is_causal in causal:
                for length in lengths:
                    bucket = cache.bucket_for(
                        implementation,
                        head_dim=head_dim,
                        dtype=dtype,
                        causal=is_causal,
                        length=length,
                        device=device,
                    )
                    if bucket.head_dim != head_dim:
                        raise ValueError(
                            f"tune at bucket head dims (powers of two >= 16), got {head_dim}"
                        )
                    base = _start(tunable, chosen, bucket)
                    problem = (max(1, tokens // length), length, hidden // head_dim)
                    candidates = {s.name: _candidates(tunable, s, bucket, base) for s in chosen}
                    plans.append(Plan(bucket, problem, base, candidates))
    return plans


def _start(tunable: cache.Tunable, chosen: Sequence[cache.Search], bucket) -> Any:
    """The config a bucket's first chosen search starts from: the kernel's default when the
    searches start at the first one; when earlier searches are left out (`--searches backward`
    to retune the backward alone), the config `config=None` uses now (user cache, then shipped
    table), so the result keeps the fields those earlier searches chose."""
    if chosen[0] is tunable.searches[0]:
        return tunable.default(bucket)
    return cache.resolve(bucket)[0]


def _on_accelerator() -> bool:
    return jax.default_backend() == "gpu"


def tune(
    implementation: str = "triton",
    *,
    head_dims: Sequence[int] = DEFAULT_HEAD_DIMS,
    dtypes: Sequence[str] = ("bfloat16",),
    causal: Sequence[bool] = (False, True),
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    tokens: int = TOKENS,
    hidden: int = HIDDEN,
    searches: Sequence[str] | None = None,
    repeats: int = 5,
    cache_file: str | os.PathLike | None = None,
    write: bool = True,
    progress: bool = True,
    allow_cpu: bool = False,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    log_file: str | os.PathLike | None = None,
    confirm: int = 3,
) -> list[Result]:
    """Tune a kernel on this GPU: per bucket, time every candidate config and keep the fastest.

    Each bucket is timed at one problem of FlashAttention's benchmark shapes: T = S = length,
    batch = tokens // length, heads = hidden // head_dim. The kernel's searches run in order,
    each from the winner of the one before (for the Triton kernel: the forward tiles timed on
    the forward alone, then the backward tiles timed on forward+backward); later searches run
    alone start from the config `config=None` uses now (`_start`). Every time is the
    median of `repeats` after warm-up. A candidate that fails to build, compile (too much
    shared memory, registers) or run is skipped and noted in the result. Winners are merged into
    `cache_file` (default: `cache_path()`) after each bucket, so an interrupted run keeps what
    it finished; `config=None` uses them from the next trace on (functions already jitted keep
    the config they were traced with).

    Args:
      implementation: a registered tunable kernel ('triton', ...).
      head_dims, dtypes, causal, lengths: the buckets to tune (one length per length range).
      tokens, hidden: the problem size per bucket (see above).
      searches: names of the kernel's searches to run (default: all); without the first, the
        first chosen starts from the cached or shipped config, not the kernel's default.
      repeats: timed repetitions per candidate.
      cache_file: the JSON cache to write (default: $JATTN_AUTOTUNE_CACHE or the user cache).
      write: False to only return the results.
      progress: a tqdm progress bar over all candidates.
      allow_cpu: tune off the GPU too (interpret-mode times mean nothing: for tests).
      timer: fn -> ms, replacing the median timer (for tests).
      log_file: append one JSON line per candidate (bucket, search, config, ms or error) here.
      confirm: the fastest `confirm` candidates of each search are timed again together, in
        rounds (`time_ms_rounds`), and the winner is taken from those times, so that clock
        drift between candidates timed minutes apart does not pick it (0 or 1: off; off with a
        custom `timer`).

    Returns:
      One `Result` per bucket.

    Raises:
      RuntimeError: not on a GPU and `allow_cpu` is False.
      ValueError: see `plan`.
    """
    if not allow_cpu and not _on_accelerator():
        raise RuntimeError(
            f"jattn.autotune.tune times kernels on a GPU; the default backend is "
            f"{jax.default_backend()!r} (interpret-mode times mean nothing). "
            "Pass allow_cpu=True only to test the tuner."
        )
    tunable = cache.get_tunable(implementation)
    plans = plan(
        implementation,
        head_dims=head_dims,
        dtypes=dtypes,
        causal=causal,
        lengths=lengths,
        tokens=tokens,
        hidden=hidden,
        searches=searches,
    )
    run = tunable.run or default_run
    default_timer = timer is None
    timer = timer or (lambda fn: time_ms(fn, repeats))
    path = cache.cache_path() if cache_file is None else cache_file
    chosen = [s for s in tunable.searches if searches is None or s.name in searches]
    total = sum(len(c) for p in plans for c in p.candidates.values())
    results = []
    environment = dict(
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        date=datetime.date.today().isoformat(),
    )
    with tqdm(total=total, desc=f"autotune {implementation}", disable=not progress) as bar:
        for p in plans:
            bar.set_postfix_str(str(p.bucket), refresh=False)
            best, ms, default_ms, skipped = p.default, {}, {}, []
            for search in chosen:
                # the first search's candidates are planned; later ones start from the winner
                candidates = p.candidates[search.name]
                if search is not chosen[0]:
                    planned = len(candidates)
                    candidates = _candidates(tunable, search, p.bucket, best)
                    bar.total += len(candidates) - planned
                timed = []
                for config in candidates:
                    row = dict(bucket=str(p.bucket), search=search.name, config=_fields(config))
                    try:
                        t = float(timer(run(p.bucket, config, search.mode, p.problem)))
                    except Exception as e:  # compile/resource failures: note and go on
                        first_line = (str(e).splitlines() or [""])[0][:200]
                        skipped.append(f"{search.name}: {config}: {type(e).__name__}: {first_line}")
                        _log(log_file, dict(row, error=f"{type(e).__name__}: {first_line}"))
                    else:
                        _log(log_file, dict(row, ms=t))
                        timed.append((t, config))
                        if config == best:
                            default_ms[search.name] = t
                    bar.update()
                if default_timer and confirm > 1 and len(timed) > 1:
                    timed = _confirm(p, search, run, timed[:], confirm, repeats, log_file)
                    for t, config in timed:  # the start's time from the same rounds, if there
                        if config == best:
                            default_ms[search.name] = t
                if timed:
                    t, best = min(timed, key=lambda pair: pair[0])
                    ms[search.name] = t
            result = Result(p.bucket, best, ms, default_ms, skipped)
            results.append(result)
            if write and ms:
                measured = dict(environment, batch=p.problem[0], length=p.problem[1])
                measured["heads"] = p.problem[2]
                entry = cache.Entry(p.bucket, _fields(best), ms, measured)
                cache.merge(path, [entry])
    return results


def _confirm(p: Plan, search, run, timed, count: int, repeats: int, log_file) -> list:
    """The fastest `count` of timed [(ms, config)], timed again together in rounds: [(ms,
    config)] of those that ran (all of timed if none did)."""
    finalists = sorted(timed, key=lambda pair: pair[0])[:count]
    fns = {
        i: run(p.bucket, config, search.mode, p.problem) for i, (_, config) in enumerate(finalists)
    }
    again = time_ms_rounds(fns, repeats)
    confirmed = []
    for i, (_, config) in enumerate(finalists):
        row = dict(bucket=str(p.bucket), search=search.name, config=_fields(config), confirm=True)
        if isinstance(again[i], str):
            _log(log_file, dict(row, error=again[i]))
        else:
            _log(log_file, dict(row, ms=again[i]))
            confirmed.append((again[i], config))
    return confirmed or timed


def _log(log_file: str | os.PathLike | None, row: dict[str, Any]) -> None:
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(json.dumps(row) + "\n")


def _fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
