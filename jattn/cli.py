"""The `jattn` command line. Every command has --help.

The parser is built without JAX (`jattn/__init__.py` defers loading the library in this process):
`jattn --help` and `jattn demo --help` answer at once, and each command imports what it runs
after its arguments are parsed.
"""

import argparse
import sys

from jattn.bench import SUITES, run_bench
from jattn.demo_config import DEMO_PARTS, AttentionShape, GPTDemo

# `jattn autotune`'s parser takes its defaults from the tuner (which imports JAX): it is built
# only when that command is asked for; the others see this summary.
AUTOTUNE_HELP = "tune a kernel's configs on this GPU and store them for config=None"


def _add_demo(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "demo",
        help="run jattn's operators on this machine, checked against the reference, and time them",
        description="Run each part of the demo (all by default, in this order). 'attention': "
        "every available implementation of dot_product_attention on one shape, with forward and "
        "gradient errors against the float32 reference and median times. 'gpt': train a small "
        "GPT on jattn attention, then generate with the KV cache sharded over attention devices. "
        "'decode': attention offloading on simulated devices.",
    )
    parser.add_argument(
        "parts",
        nargs="*",
        metavar="PART",
        help=f"parts to run, of: {', '.join(DEMO_PARTS)} (default: all)",
    )
    defaults = AttentionShape()
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size B")
    parser.add_argument("--length", type=int, default=defaults.length, help="sequence length T = S")
    parser.add_argument("--heads", type=int, default=defaults.heads, help="query heads N")
    parser.add_argument(
        "--kv-heads", type=int, default=defaults.kv_heads, help="key/value heads K (N %% K == 0)"
    )
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim, help="head dim H")
    parser.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=["float32", "bfloat16", "float16"],
        help="input dtype",
    )
    parser.add_argument("--no-causal", action="store_true", help="full (non-causal) attention")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per implementation (median reported)"
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results, device and versions as JSON"
    )
    gpt = GPTDemo()
    parser.add_argument("--gpt-steps", type=int, default=gpt.steps, help="gpt part: training steps")
    parser.add_argument(
        "--sample-tokens", type=int, default=gpt.sample_tokens, help="gpt part: tokens to generate"
    )
    parser.add_argument(
        "--attention-devices",
        type=int,
        default=gpt.attention_devices,
        help="gpt part: devices the decode's KV cache and attention are sharded over "
        "(simulated CPU devices when there is no accelerator)",
    )
    parser.add_argument("--no-progress", action="store_true", help="gpt part: no progress bar")
    parser.add_argument(
        "--devices",
        type=int,
        default=8,
        help="decode part: devices to split into compute and attention devices; without that "
        "many accelerators, simulated CPU devices (set through jax_num_cpu_devices before JAX "
        "starts; if JAX is already running, the devices that exist)",
    )
    parser.add_argument(
        "--decode-steps", type=int, default=40, help="decode part: tokens to generate"
    )
    return parser


def _add_bench(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "bench",
        help="run the benchmark suites (on a GPU) and write JSON + PNG",
        description="Run benchmark suites, each in its own process, writing JSON (device, "
        "versions, date) and plots into --out. Suites: "
        + ", ".join(f"{name} (python -m {module})" for name, (module, _) in SUITES.items())
        + ". Needs the repository checkout.",
    )
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run, of: {', '.join(SUITES)} (default: all)",
    )
    parser.add_argument("--out", default="bench_results", help="folder for the JSON and PNG files")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run even without a GPU (kernels interpreted)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the suite commands (copy-pastable: with the interpreter) without running them",
    )
    return parser


def _command(argv: list[str]) -> str | None:
    """The command word of `argv` (the top-level parser has no options but --help)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    """The parser for `argv`, and the subcommand parsers by name."""
    parser = argparse.ArgumentParser(
        prog="jattn", description="jattn: attention for JAX (Pallas kernels, TSSA, decode)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    subparsers = dict(demo=_add_demo(commands), bench=_add_bench(commands))
    if _command(argv) == "autotune":
        from jattn.autotune import cli as autotune_cli

        subparsers["autotune"] = autotune_cli.add_parser(commands)
    else:
        subparsers["autotune"] = commands.add_parser("autotune", help=AUTOTUNE_HELP)
    return parser, subparsers


def _load_library() -> None:
    """Loads jattn in full: the kernels register their implementations (this process defers it
    until the arguments are parsed; see `jattn/__init__.py`)."""
    import jattn

    jattn.dot_product_attention  # noqa: B018  (the first attribute use loads the library)


def _autotune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _load_library()
    from jattn.autotune import cli as autotune_cli

    error = parser.error

    def cli_error(message: str):  # the tuner's API words -> this command's flag
        error(message.replace("Pass allow_cpu=True", "Pass --allow-cpu"))

    parser.error = cli_error
    return autotune_cli.run(args, parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subparsers = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command == "autotune":
        return _autotune(args, subparsers["autotune"])
    if args.command == "bench":
        try:
            failures = run_bench(
                args.suites or list(SUITES),
                args.out,
                allow_cpu=args.allow_cpu,
                dry_run=args.dry_run,
            )
        except ValueError as e:
            subparsers["bench"].error(str(e))
        return 1 if failures else 0
    if args.command == "demo":
        unknown = sorted(set(args.parts) - set(DEMO_PARTS))
        if unknown:
            subparsers["demo"].error(
                f"unknown demo part(s) {unknown}; choose from {list(DEMO_PARTS)}"
            )
        return _demo(args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    parts = args.parts or list(DEMO_PARTS)
    _load_library()
    from jattn import demo
    from jattn.offload import demo as offload_demo

    if "gpt" in parts:  # before JAX starts: simulated devices for the offloaded decode
        demo.use_cpu_devices(args.attention_devices)
    if "decode" in parts:  # before JAX starts: simulated CPU devices for the decode part
        gpt_devices = args.attention_devices if "gpt" in parts else 0
        device_note = offload_demo.set_device_count(max(args.devices, gpt_devices))
    if "attention" in parts:
        shape = AttentionShape(
            batch=args.batch,
            length=args.length,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            causal=not args.no_causal,
            dtype=args.dtype,
        )
        rows = demo.attention_demo(shape, args.repeats)
        if args.json:
            demo.write_json(args.json, shape, rows)
    if "gpt" in parts:
        demo.gpt_demo(
            GPTDemo(
                steps=args.gpt_steps,
                sample_tokens=args.sample_tokens,
                attention_devices=args.attention_devices,
            ),
            progress=not args.no_progress,
        )
    if "decode" in parts:
        offload_demo.decode_demo(args.devices, args.decode_steps, note=device_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
