"""The package as a user installs it: a wheel built from this tree, installed into a fresh venv
(that sees this interpreter's JAX, flax, ...: no downloads), runs `jattn --help` and the demo's
end-to-end part without the repository's `models/` folder."""

import os
import pathlib
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("jattn", "pallas_kernels", "pyproject.toml", "README.md")

TINY_GPT_DEMO = """
from jattn import demo
demo.use_cpu_devices(4)  # before JAX starts: the decode's cache is sharded over 4 devices
import importlib.util, jattn
assert importlib.util.find_spec("models") is None, "the repository's models/ is importable"
assert "site-packages" in jattn.__file__, jattn.__file__
result = demo.gpt_demo(
    demo.GPTDemo(steps=2, batch_size=2, seq_len=16, dim=16, layers=1, heads=2, kv_heads=2,
                 sample_tokens=4, corpus_bytes=30_000),
    progress=False,
)
assert result["sample"].startswith("def "), result
print("demo ok from", jattn.__file__)
"""


def _run(command, cwd, **kwargs):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_installed_wheel_runs_the_demo_without_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside it
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, source], tmp_path
    )
    (wheel,) = tmp_path.glob("jattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jattn/examples/gpt.py" in names and not any(n.startswith("models/") for n in names)
    tables = (
        "jattn/autotune/tables/nvidia_h100_80gb_hbm3.json",
        "jattn/autotune/dispatch_tables/nvidia_h200.json",
    )
    assert all(table in names for table in tables), [n for n in names if n.endswith(".json")]

    venv = tmp_path / "venv"
    try:  # like --system-site-packages, but also from inside a venv (CI's): see the .pth below
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", venv], check=True, capture_output=True
        )
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot create a venv here: {e}")
    # This interpreter's site-packages, after the venv's own: JAX & co. (and pip) without a
    # download, while the venv's jattn is the wheel's (an editable install's finder, a .pth in
    # those folders, is not run from a path added this way).
    (venv_site,) = venv.glob("lib/python*/site-packages")
    (venv_site / "parent_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    _run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env=env
    )
    workdir = tmp_path / "elsewhere"  # not the checkout: models/ is not on the path
    workdir.mkdir()
    help_text = _run([venv / "bin" / "jattn", "--help"], workdir, env=env).stdout
    assert help_text.startswith("usage: jattn")
    out = _run([python, "-c", TINY_GPT_DEMO], workdir, env=env).stdout
    assert f"demo ok from {venv}" in out and "sharded_decode_attention" in out
