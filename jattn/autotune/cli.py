"""`jattn autotune`: tune a kernel on this GPU (or list the search space with --dry-run)."""

import argparse
import sys

from jattn.autotune import cache, tuner


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "autotune",
        help="tune a kernel's configs on this GPU and store them for config=None",
        description="Time every candidate config of a kernel per bucket (head dim, dtype, causal, "
        f"length range {', '.join(cache.LENGTH_RANGES)} of max(T, S)) on this GPU and merge the "
        "winners into the autotune cache, which jattn.dot_product_attention(config=None) reads. "
        f"Cache: ${cache.CACHE_ENV}, else $XDG_CACHE_HOME/jattn/autotune.json, else "
        f"~/.cache/jattn/autotune.json; ${cache.ENABLE_ENV}=0 turns lookups off.",
    )
    parser.add_argument(
        "--implementation",
        default="triton",
        help="the kernel to tune (a registered tunable implementation; default: triton)",
    )
    parser.add_argument(
        "--head-dims",
        type=int,
        nargs="+",
        default=list(tuner.DEFAULT_HEAD_DIMS),
        help="head dims H to tune (powers of two >= 16; a bucket serves every H up to it)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["bfloat16"],
        choices=["bfloat16", "float16", "float32"],
        help="input dtypes to tune",
    )
    parser.add_argument(
        "--causal",
        choices=["both", "yes", "no"],
        default="both",
        help="tune causal attention, full attention, or both",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(tuner.DEFAULT_LENGTHS),
        help="sequence lengths T = S to time at, one per length range",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=tuner.TOKENS,
        help="tokens per problem: batch = tokens // length",
    )
    parser.add_argument(
        "--hidden", type=int, default=tuner.HIDDEN, help="model width: heads = hidden // head dim"
    )
    parser.add_argument(
        "--searches",
        nargs="+",
        metavar="SEARCH",
        help="run only these searches of the kernel (triton: forward, backward; mosaic: forward, "
        "schedule, backward; default: all); without the first, the first chosen starts from the "
        "config that config=None uses now (cache, then shipped table), not the default",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repetitions per candidate (median kept)"
    )
    parser.add_argument(
        "--cache",
        metavar="PATH",
        help=f"cache file to write (default: ${cache.CACHE_ENV} or the user cache)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the buckets, problem shapes and candidate configs without timing anything",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="tune without a GPU (interpret-mode times mean nothing: only to test the tuner)",
    )
    parser.add_argument(
        "--log", metavar="PATH", help="append every candidate's time as a JSON line to PATH"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    options = dict(
        head_dims=args.head_dims,
        dtypes=args.dtypes,
        causal=causal,
        lengths=args.lengths,
        tokens=args.tokens,
        hidden=args.hidden,
        searches=args.searches,
    )
    path = args.cache or cache.cache_path()
    try:
        if args.dry_run:
            plans = tuner.plan(args.implementation, **options)
            total = sum(len(c) for p in plans for c in p.candidates.values())
            print(f"cache: {path}")
            print(f"{len(plans)} buckets, {total} candidates to time")
            for p in plans:
                batch, length, heads = p.problem
                print(f"\n{p.bucket}: B={batch} T=S={length} N={heads}")
                print(f"  start: {p.default}")
                for name, candidates in p.candidates.items():
                    print(f"  {name}: {len(candidates)} candidates")
                    for config in candidates:
                        print(f"    {config}")
            return 0
        cache.check_writable(path)
        results = tuner.tune(
            args.implementation,
            **options,
            repeats=args.repeats,
            cache_file=path,
            progress=not args.no_progress,
            allow_cpu=args.allow_cpu,
            log_file=args.log,
        )
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    except OSError as e:  # a read-only or missing folder, a non-regular file: a message
        where = e.filename or path
        print(f"jattn autotune: cannot write {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    for r in results:
        times = ", ".join(
            f"{name} {ms:.3f} ms (default {r.default_ms.get(name, float('nan')):.3f})"
            for name, ms in r.ms.items()
        )
        print(f"{r.bucket}: {r.config}\n  {times}; {len(r.skipped)} skipped")
        for note in r.skipped:
            print(f"    skipped {note}")
    print(f"written to {path}")
    return 0
