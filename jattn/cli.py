"""The `jattn` command line. Every command has --help."""

import argparse
import sys

from jattn import bench, demo
from jattn.autotune import cli as autotune_cli
from jattn.offload import demo as offload_demo


def _add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="run jattn's operators on this machine, checked against the reference, and time them",
        description="Run each part of the demo (all by default). 'attention': every available "
        "implementation of dot_product_attention on one shape, with forward and gradient errors "
        "against the float32 reference and median times.",
    )
    parser.add_argument(
        "parts",
        nargs="*",
        metavar="PART",
        help=f"parts to run, of: {', '.join(demo.DEMO_PARTS)} (default: all)",
    )
    defaults = demo.AttentionShape()
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
    gpt = demo.GPTDemo()
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


def _add_bench(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="run the benchmark suites (on a GPU) and write JSON + PNG",
        description="Run benchmark suites, each in its own process, writing JSON (device, "
        "versions, date) and plots into --out. Suites: "
        + ", ".join(f"{name} (python -m {module})" for name, (module, _) in bench.SUITES.items())
        + ". Needs the repository checkout.",
    )
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run, of: {', '.join(bench.SUITES)} (default: all)",
    )
    parser.add_argument("--out", default="bench_results", help="folder for the JSON and PNG files")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run even without a GPU (kernels interpreted)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the suite commands without running them"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jattn", description="jattn: attention for JAX (Pallas kernels, TSSA, decode)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    _add_bench(commands)
    autotune_parser = autotune_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "autotune":
        return autotune_cli.run(args, autotune_parser)
    if args.command == "bench":
        try:
            failures = bench.run_bench(
                args.suites or list(bench.SUITES),
                args.out,
                allow_cpu=args.allow_cpu,
                dry_run=args.dry_run,
            )
        except ValueError as e:
            parser.error(str(e))
        return 1 if failures else 0
    if args.command == "demo":
        unknown = sorted(set(args.parts) - set(demo.DEMO_PARTS))
        if unknown:
            parser.error(f"unknown demo part(s) {unknown}; choose from {list(demo.DEMO_PARTS)}")
        parts = args.parts or list(demo.DEMO_PARTS)
        if "gpt" in parts:  # before JAX starts: simulated devices for the offloaded decode
            demo.use_cpu_devices(args.attention_devices)
        if "decode" in parts:  # before JAX starts: simulated CPU devices for the decode part
            gpt_devices = args.attention_devices if "gpt" in parts else 0
            device_note = offload_demo.set_device_count(max(args.devices, gpt_devices))
        if "attention" in parts:
            shape = demo.AttentionShape(
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
                demo.GPTDemo(
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
