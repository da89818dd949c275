"""The `jattn` command line and the README: its commands and its snippets actually run."""

import pathlib
import re
import subprocess
import sys

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


def test_demo_rejects_unknown_parts():
    with pytest.raises(SystemExit):
        cli.main(["demo", "nonsense"])


def test_bench_lists_every_suite_and_refuses_unknown_ones(capsys, tmp_path):
    out = tmp_path / "somewhere"
    assert cli.main(["bench", "--dry-run", "--out", str(out)]) == 0
    assert not out.exists()  # a dry run writes nothing
    printed = capsys.readouterr().out
    for module in ("benchmarks.flash", "benchmarks.decode", "benchmarks.tssa", "models.train_tost"):
        assert f"-m {module}" in printed
    assert f"{out}/tost_vs_softmax.json" in printed
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonsense"])
