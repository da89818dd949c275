"""Train ToST models and their softmax-attention baselines; compare them on one budget.

    python -m models.train_tost vision --attention tssa      # sklearn digits classifier
    python -m models.train_tost lm --attention softmax       # byte LM on the Python stdlib
    python -m models.train_tost compare --out results.json   # both kinds, both tasks, + scaling

Each run resumes from its --workdir's newest checkpoint (Ctrl-C or SIGTERM saves one first);
metrics go to <workdir>/metrics.jsonl.

`compare` trains every (task, attention) pair with the same steps, batch and width, then times
one forward+backward of each language model at growing sequence length and reads the compiled
program's peak temporary memory: TSSA grows linearly with T, softmax attention quadratically in
compute (and, through the materialising `xla` path, in memory).
"""

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import gpt, text_data, tost, train_gpt, training, vision_data

VISION_DEFAULTS = training.TrainConfig(
    steps=600, batch_size=64, learning_rate=2e-3, warmup_steps=50, eval_every=200,
    log_every=50, checkpoint_every=200, weight_decay=0.05,
)  # fmt: skip
LM_DEFAULTS = training.TrainConfig(
    steps=400, batch_size=16, learning_rate=3e-3, warmup_steps=40, eval_every=200,
    log_every=50, checkpoint_every=200,
)  # fmt: skip


def _common(parser, defaults: training.TrainConfig, workdir: str) -> None:
    parser.add_argument("--workdir", default=workdir, help="checkpoints, config and metrics")
    parser.add_argument(
        "--attention", choices=tost.ATTENTION_KINDS, default="tssa", help="token mixer"
    )
    parser.add_argument("--dim", type=int, default=None, help="model width (default per task)")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default per task)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    training.add_train_flags(parser, defaults)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.train_tost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = parser.add_subparsers(dest="task", required=True)
    raw = dict(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vision = tasks.add_parser(
        "vision", help="classify sklearn's digits (or --images FILE.npz)", **raw
    )
    _common(vision, VISION_DEFAULTS, "runs/tost_vision")
    vision.add_argument(
        "--images", help=".npz with images [N, H, W] and labels [N] (default: sklearn digits)"
    )
    vision.add_argument("--patch", type=int, default=2, help="patch size in pixels")
    lm = tasks.add_parser("lm", help="causal byte LM on text", **raw)
    _common(lm, LM_DEFAULTS, "runs/tost_lm")
    _lm_flags(lm)
    compare = tasks.add_parser(
        "compare",
        help="both attentions on both tasks, plus scaling; writes JSON",
        **raw,
    )
    compare.add_argument("--out", default="tost_vs_softmax.json", help="results JSON path")
    compare.add_argument("--plot", help="also plot tokens/s and memory against T (PNG)")
    compare.add_argument(
        "--plot-only", action="store_true", help="re-plot --out's JSON (no training)"
    )
    compare.add_argument("--workdir", default="runs/tost_compare", help="run directories")
    compare.add_argument(
        "--vision-steps",
        type=int,
        default=VISION_DEFAULTS.steps,
        help=f"training steps of each vision run (default: {VISION_DEFAULTS.steps})",
    )
    compare.add_argument(
        "--lm-steps",
        type=int,
        default=LM_DEFAULTS.steps,
        help=f"training steps of each language model run (default: {LM_DEFAULTS.steps})",
    )
    compare.add_argument(
        "--lengths",
        type=int,
        nargs="*",
        default=[256, 1024, 4096, 8192],
        help="sequence lengths for the tokens/s and memory scaling",
    )
    compare.add_argument("--seed", type=int, default=0, help="seed for every run")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _lm_flags(parser) -> None:
    parser.add_argument("--text", nargs="*", metavar="PATH", help="files/dirs (default: stdlib)")
    parser.add_argument("--max-corpus-bytes", type=int, default=4_000_000, help="corpus cap")
    parser.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches")


def run_vision(args, data: vision_data.ImageData | None = None) -> dict:
    config = training.train_config_from_args(args)
    data = data or vision_data.load_images(args.images, patch=args.patch)
    model_config = tost.VisionConfig(
        attention=args.attention,
        num_tokens=data.train_x.shape[1],
        patch_dim=data.train_x.shape[2],
        num_classes=data.num_classes,
        dim=args.dim or 64,
        depth=args.depth or 4,
        heads=args.heads,
    )
    model = tost.VisionTransformer(model_config, rngs=nnx.Rngs(config.seed))
    test_x, test_y = jnp.asarray(data.test_x), jnp.asarray(data.test_y)

    @jax.jit
    def accuracy_and_loss(model):
        return jnp.mean(jnp.argmax(model(test_x), -1) == test_y), tost.classification_loss(
            model, (test_x, test_y)
        )

    def evaluate(model):
        accuracy, loss = accuracy_and_loss(model)
        return dict(test_accuracy=float(accuracy), test_loss=float(loss))

    result = training.train(
        model,
        tost.classification_loss,
        lambda step: data.batch(config.seed, step, config.batch_size),
        config,
        args.workdir,
        evaluate=evaluate,
        items_per_batch=config.batch_size,
        run_info=dict(model=dataclasses.asdict(model_config), images=args.images),
        resume=not args.no_resume,
        progress=not args.no_progress,
    )
    return _summary(result, model_config, "images_per_s")


def run_lm(args, corpus: text_data.TextCorpus | None = None) -> dict:
    config = training.train_config_from_args(args)
    corpus = corpus or text_data.load_corpus(args.text, max_bytes=args.max_corpus_bytes)
    model_config = tost.LMConfig(
        attention=args.attention,
        max_length=args.seq_len,
        dim=args.dim or 128,
        depth=args.depth or 2,
        heads=args.heads,
    )
    model = tost.CausalLM(model_config, rngs=nnx.Rngs(config.seed))
    run_info = dict(
        model=dataclasses.asdict(model_config),
        text=args.text,
        max_corpus_bytes=args.max_corpus_bytes,
        seq_len=args.seq_len,
    )
    result = train_gpt.train_on_corpus(model, corpus, config, args, run_info)
    return _summary(result, model_config, "tokens_per_s")


def _summary(result: training.TrainResult, model_config, rate_name: str) -> dict:
    lines = result.history
    rates = [line["items_per_s"] for line in lines if "items_per_s" in line]
    rates = rates[1:] or rates  # the first interval includes compilation
    final_eval = [line for line in lines if "loss" not in line][-1]
    return dict(
        attention=model_config.attention,
        params=tost.count_params(result.model),
        config=dataclasses.asdict(model_config),
        final_train_loss=[line["loss"] for line in lines if "loss" in line][-1],
        **{k: v for k, v in final_eval.items() if k != "step"},
        **{rate_name: float(np.median(rates)) if rates else None},
    )


def scaling(lengths: list[int], dim: int = 128, depth: int = 2, heads: int = 4) -> list[dict]:
    """One forward+backward of each LM at batch 1 and growing T: median time, peak temp memory."""
    from jattn.demo import median_ms

    rows = []
    kinds = [("tssa", None), ("softmax", None), ("softmax", "xla")]
    for length in lengths:
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, length + 1)), jnp.int32)
        for kind, implementation in kinds:
            if implementation == "xla" and length > 4096:
                continue  # the materialising path: B*N*T*T float32 scores per layer, skip
            config = tost.LMConfig(
                attention=kind, max_length=length, dim=dim, depth=depth, heads=heads
            )
            model = tost.CausalLM(config, rngs=nnx.Rngs(0))
            if implementation:
                for block in model.blocks:
                    block.attention.implementation = implementation
            graphdef, state, rest = nnx.split(model, nnx.Param, ...)

            def loss(state, tokens, graphdef=graphdef, rest=rest):
                return gpt.next_token_loss(nnx.merge(graphdef, state, rest), tokens)

            step = jax.jit(jax.value_and_grad(loss))
            compiled = step.lower(state, tokens).compile()
            memory = compiled.memory_analysis()
            temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
            ms = median_ms(lambda f=compiled, s=state, t=tokens: f(s, t), repeats=3)
            rows.append(
                dict(
                    attention=kind if implementation is None else f"{kind} ({implementation})",
                    length=length,
                    fwd_bwd_ms=ms,
                    tokens_per_s=length / ms * 1e3,
                    peak_temp_bytes=temp,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def compare(args) -> dict:
    from jattn.demo import environment

    root = pathlib.Path(args.workdir)
    common = ["--seed", str(args.seed), "--no-resume"] + (
        ["--no-progress"] if args.no_progress else []
    )
    parser = build_parser()
    data = vision_data.load_images()
    corpus = text_data.load_corpus(max_bytes=4_000_000)
    results = dict(environment(), vision=[], lm=[])
    for kind in tost.ATTENTION_KINDS:
        flags = ["vision", "--attention", kind, "--workdir", str(root / f"vision_{kind}")]
        flags += ["--steps", str(args.vision_steps), *common]
        results["vision"].append(run_vision(parser.parse_args(flags), data))
        print(json.dumps(results["vision"][-1]), flush=True)
    for kind in tost.ATTENTION_KINDS:
        flags = ["lm", "--attention", kind, "--workdir", str(root / f"lm_{kind}")]
        flags += ["--steps", str(args.lm_steps), *common]
        results["lm"].append(run_lm(parser.parse_args(flags), corpus))
        print(json.dumps(results["lm"][-1]), flush=True)
    results["scaling"] = scaling(args.lengths)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(format_tables(results))
    if args.plot:
        plot(results, args.plot)
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in dict.fromkeys(row["attention"] for row in results["scaling"]):
        rows = [row for row in results["scaling"] if row["attention"] == kind]
        lengths = [row["length"] for row in rows]
        speed.plot(lengths, [row["tokens_per_s"] for row in rows], "o-", label=kind)
        if all(row["peak_temp_bytes"] for row in rows):
            memory.plot(lengths, [row["peak_temp_bytes"] / 2**20 for row in rows], "o-", label=kind)
    for axis, label in ((speed, "tokens/s (fwd+bwd, batch 1)"), (memory, "peak temp MiB")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"ToST (TSSA) vs softmax attention LM, {results['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def format_tables(results: dict) -> str:
    lines = ["| task | attention | params | result | throughput |", "|---|---|---|---|---|"]
    for row in results["vision"]:
        lines.append(
            f"| digits | {row['attention']} | {row['params']:,} | test accuracy "
            f"{row['test_accuracy']:.3f} | {row['images_per_s']:,.0f} images/s |"
        )
    for row in results["lm"]:
        lines.append(
            f"| stdlib bytes LM | {row['attention']} | {row['params']:,} | val loss "
            f"{row['val_loss']:.3f} | {row['tokens_per_s']:,.0f} tokens/s |"
        )
    lines += [
        "",
        "| T | attention | fwd+bwd ms | tokens/s | peak temp MiB |",
        "|---|---|---|---|---|",
    ]
    for row in results["scaling"]:
        memory = row["peak_temp_bytes"]
        memory = "-" if memory is None else f"{memory / 2**20:,.1f}"
        lines.append(
            f"| {row['length']} | {row['attention']} | {row['fwd_bwd_ms']:,.1f} | "
            f"{row['tokens_per_s']:,.0f} | {memory} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.task == "compare":
        if args.plot_only:
            results = json.loads(pathlib.Path(args.out).read_text())
            print(format_tables(results))
            if args.plot:
                plot(results, args.plot)
        else:
            compare(args)
        return 0
    try:
        summary = run_vision(args) if args.task == "vision" else run_lm(args)
    except training.ResumeError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
