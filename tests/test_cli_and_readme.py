"""The `jattn` command line and the README: its commands and its snippets actually run."""

import pathlib
import re
import shlex
import subprocess
import sys

import jax
import pytest

from jattn import cli, demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INSTALL_AND_DEMO = "pip install -e . && jattn demo"
INSTALL_AND_TEST = 'pip install -e ".[test]" && pytest'


def test_readme_states_the_two_commands_and_ci_runs_the_test_one():
    assert INSTALL_AND_DEMO in README and INSTALL_AND_TEST in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci
    assert re.search(r"^pytest$", ci, re.MULTILINE)


def test_readme_names_no_development_machine_paths_and_the_current_implementations():
    assert "/work/" not in README and "../shared" not in README
    (printed,) = re.findall(r"print\(jattn.available_implementations\(\)\)  # (\(.*\))", README)
    import jattn

    assert sorted(eval(printed)) == sorted(jattn.available_implementations())
    text = " ".join(README.split())
    order = [text.index(f"`{part}`, ") for part in ("attention", "gpt", "decode")]
    assert "in the order they run" in text and order == sorted(order)
    assert demo.DEMO_PARTS == ("attention", "gpt", "decode")  # the order the README gives


def test_readme_snippets_run():
    snippets = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    assert len(snippets) >= 4
    namespace: dict = {}
    for snippet in snippets:  # one namespace: later snippets build on earlier ones
        exec(compile(snippet, "README.md", "exec"), namespace)


@pytest.mark.parametrize("command", [[], ["demo"], ["bench"]])
def test_every_command_has_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "jattn.cli", *command, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage: jattn" in result.stdout


def test_demo_checks_and_times_every_implementation(capsys):
    cli.main(  # the attention part; the gpt and decode parts have their own tests
        [
            "demo",
            "attention",
            "--length",
            "48",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "16",
            "--repeats",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert "implementation" in printed
    rows = demo.run_attention_demo(
        demo.AttentionShape(length=40, heads=4, kv_heads=1, head_dim=24), repeats=1
    )
    by_name = {r.implementation: r for r in rows}
    assert by_name["xla_chunked"].status == "ok"
    assert by_name["xla_chunked"].max_error < 1e-5
    assert by_name["xla_chunked"].max_grad_error < 1e-4
    assert by_name["xla_chunked"].forward_ms > 0


def test_demo_rejects_unknown_parts_with_the_demo_usage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "nonsense"])
    err = capsys.readouterr().err
    assert err.startswith("usage: jattn demo ") and "unknown demo part(s) ['nonsense']" in err


def _imported_modules(importtime_log: str) -> set[str]:
    """The modules `python -X importtime` reported importing."""
    lines = [line.split("|")[-1].strip() for line in importtime_log.splitlines()]
    return {line for line in lines if line and not line.startswith("imported package")}


@pytest.mark.parametrize(
    "how",
    [
        ["-c", "import sys; sys.argv[0] = 'jattn'; from jattn.cli import main; main(['--help'])"],
        ["-m", "jattn.cli", "demo", "--help"],
        ["-m", "jattn.cli", "bench", "--dry-run"],
    ],
    ids=["console-script", "demo-help", "bench-dry-run"],
)
def test_help_answers_without_importing_jax(how):
    # The console script's process (argv[0] 'jattn') and `python -m jattn.cli` defer the library.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *how], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    heavy = {m for m in _imported_modules(result.stderr) if m.split(".")[0] in ("jax", "flax")}
    assert not heavy, sorted(heavy)[:5]


def test_the_command_line_process_loads_the_library_on_first_use():
    code = (
        "import sys; sys.argv[0] = 'jattn'; import jattn; assert 'jax' not in sys.modules; "
        "print(jattn.available_implementations(), jattn.nn.MultiHeadAttention.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'triton'" in result.stdout and "'mosaic'" in result.stdout  # the kernels registered


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU refusal")
def test_autotune_on_cpu_names_the_command_line_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["autotune", "--head-dims", "64", "--lengths", "256", "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: jattn autotune ") and "Pass --allow-cpu" in err
    assert "allow_cpu=True" not in err


def test_autotune_summary_matches_its_parser():
    import argparse

    from jattn.autotune import cli as autotune_cli

    commands = argparse.ArgumentParser().add_subparsers()
    autotune_cli.add_parser(commands)
    assert commands._choices_actions[0].help == cli.AUTOTUNE_HELP


def test_bench_lists_every_suite_and_refuses_unknown_ones(capsys, tmp_path):
    out = tmp_path / "somewhere"
    assert cli.main(["bench", "--dry-run", "--out", str(out)]) == 0
    assert not out.exists()  # a dry run writes nothing
    printed = capsys.readouterr().out
    for module in ("benchmarks.flash", "benchmarks.decode", "benchmarks.tssa", "models.train_tost"):
        assert f"-m {module}" in printed
    for line in printed.splitlines():  # copy-pastable: from the checkout, with this interpreter
        words = shlex.split(line.split("] ", 1)[1])
        assert words[:4] == ["cd", str(ROOT), "&&", sys.executable] and words[4] == "-m"
    assert f"{out}/tost_vs_softmax.json" in printed
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonsense"])


def test_readme_mosaic_forward_table_is_the_committed_run():
    """Each cell of the README's H200 forward table (jattn mosaic / cuDNN / tokamax TFLOP/s)
    is the committed run's, rounded: the README quotes measurements, not claims."""
    _check_readme_table("flash_h200_bf16_fwd_stop46.json", prefix="")


def test_readme_mosaic_forward_backward_table_is_the_committed_run():
    """The same for the README's H200 forward+backward table (– where the run has no cell)."""
    _check_readme_table("flash_h200_bf16_fwdbwd_stop46.json", prefix="H=")


def test_readme_features_table_is_the_committed_run():
    """Each cell of the README's H200 features table (ms: jattn mosaic, jattn auto, tokamax,
    cuDNN; – where a peer declined) is the committed run's, to 3 decimals."""
    import json

    path = ROOT / "benchmarks/results/flash_features_h200_merged_stop46.json"
    run = json.loads(path.read_text())
    ms = {(r["feature"], r["mode"], r["peer"]): r.get("ms") for r in run["rows"]}
    peers = ("jattn_mosaic", "jattn_auto", "tokamax_mosaic", "cudnn")
    pattern = r"^\| ([a-z_0-9]+) \| (fwd|fwd\+bwd) \|((?: (?:\d+\.\d{3}|–) \|){4})$"
    quoted_rows = re.findall(pattern, README, re.M)
    assert len(quoted_rows) == 13
    for feature, mode, cells in quoted_rows:
        for peer, quoted in zip(peers, cells.strip(" |").split(" | "), strict=True):
            want = ms[(feature, mode, peer)]
            assert quoted == ("–" if want is None else f"{want:.3f}"), (feature, mode, peer)


def _check_readme_table(run: str, prefix: str) -> None:
    """The README's six rows `| {prefix}H | causal | mosaic / cuDNN / tokamax | ...` (T = 512
    to 16k) against the rows of benchmarks/results/`run`."""
    import json

    rows = json.loads((ROOT / "benchmarks/results" / run).read_text())["rows"]
    tflops = {(r["head_dim"], r["causal"], r["length"], r["peer"]): r["tflops"] for r in rows}
    pattern = rf"^\| {prefix}(64|128|256) \| (no|yes) \|((?: (?:\d+ / \d+ / \d+|–) \|){{6}})$"
    quoted_rows = re.findall(pattern, README, re.M)
    assert len(quoted_rows) == 6
    lengths = (512, 1024, 2048, 4096, 8192, 16384)
    peers = ("jattn_mosaic", "cudnn", "tokamax_mosaic")
    for head_dim, causal, cells in quoted_rows:
        for length, cell in zip(lengths, cells.strip(" |").split(" | "), strict=True):
            key = (int(head_dim), causal == "yes", length)
            if cell == "–":  # a cell the run did not measure
                assert (*key, "jattn_mosaic") not in tflops, key
                continue
            for peer, quoted in zip(peers, cell.split(" / "), strict=True):
                assert int(quoted) == round(tflops[(*key, peer)]), (*key, peer)
