"""Runs a graph model's training script over several seeds and summarises the test accuracy.

    python -m models.graph_seeds --model hganet --dataset cora --seeds 10 -- --k 8

Every run is `models.<model>.main([... --seed s])` in this process; the summary (mean, std over
seeds, every run's JSON) is printed as the last stdout line and optionally appended to `--out`.
"""

import argparse
import importlib
import json
import pathlib
import statistics
import sys
from collections.abc import Sequence

MODELS = ("gat", "hganet", "cganet")


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--dataset", default="cora")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file to add this summary to")
    p.add_argument("--label", default=None, help="name of this configuration in --out")
    args = p.parse_args(argv)
    script = importlib.import_module(f"models.{args.model}")
    runs = []
    for seed in range(args.seeds):
        run_argv = ["--dataset", args.dataset, "--seed", str(seed), "--no-progress", *extra]
        if args.data_dir:
            run_argv += ["--data-dir", args.data_dir]
        runs.append(script.main(run_argv))
        if args.out:  # every finished run, so that an interrupted sweep keeps its seeds
            with open(pathlib.Path(args.out).with_suffix(".runs.jsonl"), "a") as f:
                f.write(json.dumps(dict(label=args.label, **runs[-1])) + "\n")
    acc = [r["test_accuracy"] for r in runs]
    summary = dict(
        model=args.model,
        dataset=args.dataset,
        label=args.label or " ".join(extra) or "default",
        args=extra,
        seeds=args.seeds,
        test_accuracy_mean=round(statistics.mean(acc), 2),
        test_accuracy_std=round(statistics.pstdev(acc), 2),
        val_accuracy_mean=round(statistics.mean(r["val_accuracy"] for r in runs), 2),
        epochs_mean=round(statistics.mean(r["epochs"] for r in runs), 1),
        seconds_mean=round(statistics.mean(r["seconds"] for r in runs), 2),
        runs=runs,
    )
    if args.out:
        path = pathlib.Path(args.out)
        record = json.loads(path.read_text()) if path.exists() else {"results": []}
        record["results"].append(summary)
        path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), flush=True)
    return summary


if __name__ == "__main__":
    main()
