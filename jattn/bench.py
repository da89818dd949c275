"""`jattn bench`: run the benchmark suites (a GPU is what they are for) and collect JSON + PNG.

Each suite is a script of the repository checkout (`benchmarks/`, `models/`), run in its own
process so that one suite's memory or failure does not touch the next; they record device,
versions and date with every measurement.
"""

import pathlib
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# suite -> (module, arguments); "{out}" is the output folder.
SUITES: dict[str, tuple[str, list[str]]] = {
    "flash": ("benchmarks.flash", ["--json", "{out}/flash.json", "--plot", "{out}/flash.png"]),
    "decode": ("benchmarks.decode", ["--out", "{out}/decode.json"]),
    "tssa": ("benchmarks.tssa", ["--out", "{out}/tssa.json"]),
    "graph": ("benchmarks.graph", ["--out", "{out}/graph.json"]),
    "tost": (
        "models.train_tost",
        [
            "compare",
            "--out",
            "{out}/tost_vs_softmax.json",
            "--plot",
            "{out}/tost_vs_softmax.png",
            "--workdir",
            "{out}/tost_runs",
            "--no-progress",
        ],
    ),  # fmt: skip
}


def commands(suites: list[str], out: str) -> list[list[str]]:
    """The command line of each suite (python -m <module> <arguments>)."""
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    result = []
    for suite in suites:
        module, arguments = SUITES[suite]
        result.append([sys.executable, "-m", module, *(a.format(out=out) for a in arguments)])
    return result


def _default_backend() -> str:
    import jax  # here, not at the top: `jattn bench --dry-run` does not start JAX

    return jax.default_backend()


def run_bench(
    suites: list[str], out: str, *, allow_cpu: bool = False, dry_run: bool = False
) -> int:
    """Run the suites one after another; returns how many failed. Each command is printed as
    it would be typed (from the checkout's root, with this interpreter), so it can be re-run by
    hand; `dry_run` only prints them."""
    if not (ROOT / "benchmarks").is_dir():
        raise SystemExit("jattn bench needs the repository checkout (benchmarks/ beside jattn/)")
    if not (allow_cpu or dry_run) and _default_backend() != "gpu":
        raise SystemExit(
            "jattn bench measures GPU kernels and there is no GPU here; pass --allow-cpu to run "
            "the suites anyway (Pallas kernels then run in interpret mode: very slow)"
        )
    out = str(pathlib.Path(out).absolute())  # the suites run from the checkout's root
    if not dry_run:
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    failures = 0
    for suite, command in zip(suites, commands(suites, out), strict=True):
        print(f"[{suite}] cd {shlex.quote(str(ROOT))} && {shlex.join(command)}", flush=True)
        if dry_run:
            continue
        code = subprocess.call(command, cwd=ROOT)
        if code:
            failures += 1
            print(f"[{suite}] failed with exit code {code}", flush=True)
    return failures
