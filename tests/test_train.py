"""Training scripts: exact resume after a kill, the optimiser's decay mask, data, --help."""

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from models import text_data, training

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_GPT = [
    "--dim", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--seq-len", "32",
    "--batch-size", "4", "--steps", "150", "--log-every", "1", "--checkpoint-every", "10",
    "--eval-every", "50", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress",
    "--text", str(pathlib.Path(argparse.__file__)),  # a fixed real text
]  # fmt: skip


def _train_gpt(workdir, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "models.train_gpt", "--workdir", str(workdir), *TINY_GPT]
    return subprocess.Popen(
        [*command, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _last_checkpoint(workdir):
    manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints")
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.StandardRestore())


@pytest.mark.slow  # tests/test_training_scripts.py resumes interrupted runs bit for bit too
def test_killed_run_resumes_to_the_same_bits(tmp_path):
    uninterrupted = _train_gpt(tmp_path / "full")
    killed = _train_gpt(tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and json.loads(lines[-1])["step"] >= 25:  # past two checkpoints: kill it
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert killed.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read().decode()
    killed_at, _ = _last_checkpoint(tmp_path / "killed")
    assert 10 <= killed_at < 150
    resumed = _train_gpt(tmp_path / "killed")
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err.decode()
    assert f"resumed from step {killed_at}" in out.decode()
    step_a, state_a = _last_checkpoint(tmp_path / "full")
    step_b, state_b = _last_checkpoint(tmp_path / "killed")
    assert step_a == step_b == 150
    assert training.tree_equal(state_a, state_b)  # parameters and optimiser state, bit for bit
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]
    full_lines, resumed_lines = read(tmp_path / "full" / "metrics.jsonl"), read(metrics)
    assert [line["step"] for line in resumed_lines] == [line["step"] for line in full_lines]
    losses = lambda lines: [
        (line["step"], line.get("loss"), line.get("val_loss")) for line in lines
    ]
    assert losses(resumed_lines) == losses(full_lines)
    assert full_lines[-1]["val_loss"] < full_lines[0]["loss"]  # it learned something


# tests/test_training_scripts.py::test_train_gpt_resumes_when_only_sampling_flags_change takes
# the same path in-process (train_gpt.main's ResumeError -> SystemExit "error: ... other
# settings"), and test_resume_compares_only_what_defines_the_run the learning-rate
# difference; this one adds the exit status of a real process, for ~12 s of two interpreters.
@pytest.mark.slow
def test_resume_refuses_other_settings(tmp_path):
    run = _train_gpt(tmp_path, "--steps", "10")
    assert run.wait() == 0
    run = _train_gpt(tmp_path, "--steps", "10", "--learning-rate", "0.1")
    assert run.wait() == 1 and b"other settings" in run.stderr.read()


def test_decay_mask_excludes_temperatures_biases_and_norms():
    params = {
        "attn": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4), "temperature": jnp.ones(2)},
        "tssa": {"denom_bias": jnp.ones((2, 8)), "proj": {"kernel": jnp.ones((4, 2, 2))}},
        "norm": {"scale": jnp.ones(4)},
        "embed": {"embedding": jnp.ones((16, 4))},
    }
    mask = training.decay_mask(params)
    assert mask == {
        "attn": {"kernel": True, "bias": False, "temperature": False},
        "tssa": {"denom_bias": False, "proj": {"kernel": True}},  # official ToST: no decay
        "norm": {"scale": False},
        "embed": {"embedding": True},
    }
    # With zero gradients only the decayed leaves move.
    config = training.TrainConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    optimizer = training.make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == mask


def test_schedule_warms_up_then_decays_to_the_floor():
    config = training.TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    schedule = training.learning_rate_schedule(config)
    values = np.array([float(schedule(s)) for s in range(101)])
    assert values[0] == 0 and abs(values[10] - 1.0) < 1e-6
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 1e-7)
    assert abs(values[100] - 0.1) < 1e-6


def test_text_corpus_is_the_stdlib_or_user_files(tmp_path):
    files = text_data.stdlib_sources()
    assert any(f.name == "argparse.py" for f in files) and all(f.suffix == ".py" for f in files)
    (tmp_path / "a.txt").write_text("hello world " * 200)
    corpus = text_data.load_corpus([tmp_path], max_bytes=None)
    assert corpus.num_files == 1 and len(corpus.valid) > 0
    batch = corpus.batch("train", 3, 7, 5, 16)
    assert batch.shape == (5, 17) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, corpus.batch("train", 3, 7, 5, 16))  # (seed, step)
    assert not np.array_equal(batch, corpus.batch("train", 3, 8, 5, 16))
    assert text_data.decode(text_data.encode("déjà vu")) == "déjà vu"
    with pytest.raises(FileNotFoundError):
        text_data.load_corpus([tmp_path / "missing"])


HELP_COMMANDS = ["models.train_gpt", "models.train_tost vision", "models.train_tost lm",
                 "models.train_tost compare"]  # fmt: skip
# One fresh interpreter runs each script as `python -m` does (runpy, as __main__) with --help:
# one start of Python and JAX instead of four (about 7 s of test time).
_RUN_AS_MAIN = """
import runpy, sys
for command in sys.argv[1:]:
    module, *args = command.split()
    sys.argv = [module, *args, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        print(f"<exit {e.code}>", flush=True)
"""


def test_training_scripts_have_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", _RUN_AS_MAIN, *HELP_COMMANDS],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    chunks = re.split(r"<exit (\S+)>\n", result.stdout)  # help, code, help, code, ..., ""
    assert len(chunks) == 2 * len(HELP_COMMANDS) + 1 and chunks[-1] == "", result.stdout
    for command, text, code in zip(HELP_COMMANDS, chunks[:-1:2], chunks[1::2], strict=True):
        assert code == "0" and "--workdir" in text and "--seed" in text, (command, code, text)
