"""Train the small GPT (`models/gpt.py`) on byte-level text, then sample from it.

    python -m models.train_gpt --steps 300 --workdir runs/gpt
    python -m models.train_gpt --text my_notes/ --workdir runs/notes   # your own files

Default corpus: the Python standard library's own sources (no download). Re-running with the
same --workdir resumes from the newest checkpoint (Ctrl-C or SIGTERM saves one first); a larger
--steps extends the run. Metrics: <workdir>/metrics.jsonl.
"""

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import gpt, text_data, training

DEFAULTS = training.TrainConfig(
    steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30, eval_every=100
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.train_gpt",
        description="Train a decoder-only transformer on jattn attention (byte tokens), with "
        "orbax checkpoints (resume by re-running with the same --workdir; Ctrl-C or SIGTERM "
        "saves one first), JSON-lines metrics and a sample at the end.",
    )
    parser.add_argument("--workdir", default="runs/gpt", help="checkpoints, config and metrics")
    parser.add_argument(
        "--text",
        nargs="*",
        metavar="PATH",
        help="text files or directories to train on (default: the Python stdlib's sources)",
    )
    parser.add_argument(
        "--max-corpus-bytes", type=int, default=4_000_000, help="read at most this many bytes"
    )
    model = gpt.GPTConfig()
    parser.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    parser.add_argument("--dim", type=int, default=model.dim, help="model width")
    parser.add_argument("--layers", type=int, default=model.num_layers, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=model.num_heads, help="query heads")
    parser.add_argument(
        "--kv-heads", type=int, default=model.num_kv_heads, help="key/value heads (GQA)"
    )
    parser.add_argument(
        "--implementation",
        default=None,
        help="dot_product_attention implementation (default: auto: Pallas kernels on a GPU)",
    )
    parser.add_argument(
        "--eval-batches", type=int, default=4, help="validation batches per evaluation"
    )
    parser.add_argument(
        "--sample-tokens", type=int, default=200, help="tokens to generate at the end (0: none)"
    )
    parser.add_argument("--prompt", default="def ", help="prompt for the sample")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    training.add_train_flags(parser, DEFAULTS)
    return parser


def model_config(args: argparse.Namespace) -> gpt.GPTConfig:
    return gpt.GPTConfig(
        vocab_size=text_data.VOCAB_SIZE,
        max_length=max(args.seq_len, len(args.prompt.encode()) + args.sample_tokens),
        num_layers=args.layers,
        dim=args.dim,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        implementation=args.implementation,
    )


def run_defining_model(config: gpt.GPTConfig) -> dict:
    """The model settings a resumed run must share with its checkpoint: not the KV cache size
    (`max_length`, from --prompt and --sample-tokens) nor the attention implementation."""
    settings = dataclasses.asdict(config)
    del settings["max_length"], settings["implementation"]
    return settings


def train_on_corpus(
    model: nnx.Module,
    corpus: text_data.TextCorpus,
    config: training.TrainConfig,
    args: argparse.Namespace,
    run_info: dict,
) -> training.TrainResult:
    """Train a next-token model on `corpus` (seeded batches of args.seq_len tokens), with the
    validation loss over args.eval_batches fixed batches as the evaluation."""
    eval_batches = [
        corpus.batch("valid", config.seed, i, config.batch_size, args.seq_len)
        for i in range(args.eval_batches)
    ]
    eval_loss = jax.jit(gpt.next_token_loss)

    def evaluate(model):
        return dict(val_loss=float(np.mean([eval_loss(model, b) for b in eval_batches])))

    return training.train(
        model,
        gpt.next_token_loss,
        lambda step: corpus.batch("train", config.seed, step, config.batch_size, args.seq_len),
        config,
        args.workdir,
        evaluate=evaluate,
        items_per_batch=config.batch_size * args.seq_len,
        run_info=run_info,
        resume=not args.no_resume,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace, corpus: text_data.TextCorpus | None = None) -> dict:
    """Train (or resume) and sample; returns a summary (also the last metrics line's numbers)."""
    config = training.train_config_from_args(args)
    corpus = corpus or text_data.load_corpus(args.text, max_bytes=args.max_corpus_bytes)
    model = gpt.GPT(model_config(args), rngs=nnx.Rngs(config.seed))
    run_info = dict(
        model=run_defining_model(model_config(args)),
        text=args.text,
        max_corpus_bytes=args.max_corpus_bytes,
        seq_len=args.seq_len,
    )
    result = train_on_corpus(model, corpus, config, args, run_info)
    summary = dict(
        start_step=result.start_step,
        history=result.history,
        corpus_bytes=len(corpus.train) + len(corpus.valid),
        corpus_files=corpus.num_files,
    )
    if args.sample_tokens:
        prompt = text_data.encode(args.prompt)[None]
        start = time.perf_counter()
        tokens = gpt.generate(
            result.model, jnp.asarray(prompt), args.sample_tokens, seed=config.seed
        )
        tokens = np.asarray(tokens)
        summary["sample_seconds"] = time.perf_counter() - start
        summary["sample"] = args.prompt + text_data.decode(tokens[0])
    summary["model"] = result.model
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except training.ResumeError as e:
        raise SystemExit(f"error: {e}") from None
    lines = summary["history"]
    losses = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "val_loss" in line]
    if summary["start_step"]:
        print(f"resumed from step {summary['start_step']}")
    if losses:
        last = losses[-1]
        print(
            f"step {last['step']}: loss {last['loss']:.3f}, "
            f"{last.get('items_per_s', 0):,.0f} tokens/s"
        )
    if evals:
        print(f"validation loss {evals[-1]['val_loss']:.3f} (nats per byte)")
    if "sample" in summary:
        print(f"sample ({args.sample_tokens} tokens, {summary['sample_seconds']:.1f} s):")
        print(summary["sample"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
