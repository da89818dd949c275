"""The training scripts as a user meets them: interrupted runs save and resume, a resume compares
only what defines the run, short runs keep a short warmup, and every script's --help is usable."""

import argparse
import dataclasses
import os
import pathlib
import signal
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import cganet, gat, graph_training, hganet, train_gpt, train_tost, training

TEXT = str(pathlib.Path(argparse.__file__))  # a fixed real text
TINY_GPT = [
    "--dim", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--seq-len", "16",
    "--batch-size", "2", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress",
    "--max-corpus-bytes", "20000", "--text", TEXT,
]  # fmt: skip
main_thread_only = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be installed on the main thread",
)


def _tiny_run(workdir, *, signal_at=None, signum=signal.SIGINT, run_info=None, **config):
    """A linear regression through `training.train`; `signal_at`: the step whose batch sends
    `signum` to this process (as Ctrl-C or a preemption would)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
    y = x @ jnp.arange(8.0).reshape(4, 2)

    def get_batch(step):
        if step == signal_at:
            os.kill(os.getpid(), signum)
        return x * (1 + step / 100), y

    def loss_fn(model, batch):
        return jnp.mean((model(batch[0]) - batch[1]) ** 2)

    defaults = dict(steps=12, batch_size=8, warmup_steps=2, log_every=1, eval_every=100)
    return training.train(
        nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
        loss_fn,
        get_batch,
        training.TrainConfig(**{**defaults, **config}),
        workdir,
        run_info=run_info or dict(model=dict(dim=4)),
        progress=False,
    )


@main_thread_only
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_saves_a_checkpoint_and_resumes_exactly(tmp_path, capfd, signum):
    full = _tiny_run(tmp_path / "full")
    handler = signal.getsignal(signum)
    with pytest.raises(training.Interrupted) as stopped:
        _tiny_run(tmp_path / "run", signal_at=5, signum=signum)  # checkpoint_every 100 > steps
    assert stopped.value.step == 5 and stopped.value.code == 128 + signum
    out, err = capfd.readouterr()
    assert f"no checkpoint in {tmp_path / 'run' / 'checkpoints'}, starting fresh" in out
    assert "--checkpoint-every 100 is more than the 12 steps to run" in err
    assert f"{signal.Signals(signum).name}: stopped after step 5, checkpoint saved" in err
    assert signal.getsignal(signum) is handler  # the process's own handling is back
    resumed = _tiny_run(tmp_path / "run")
    assert "resuming from step 5" in capfd.readouterr().out
    assert resumed.start_step == 5 and [line["step"] for line in resumed.history] == list(
        range(6, 13)
    )
    assert training.tree_equal(resumed.params, full.params)  # as if never interrupted


def test_resume_compares_only_what_defines_the_run(tmp_path, capsys):
    _tiny_run(tmp_path, steps=4)
    # Other intervals and more steps: resumes and continues to the new --steps.
    longer = _tiny_run(tmp_path, steps=6, log_every=2, checkpoint_every=3, eval_every=5)
    assert longer.start_step == 4 and longer.history[-1]["step"] == 6
    with pytest.raises(training.ResumeError, match="past --steps 5; pass --steps 6 or more"):
        _tiny_run(tmp_path, steps=5)
    with pytest.raises(ValueError, match="other settings") as error:
        _tiny_run(tmp_path, steps=8, run_info=dict(model=dict(dim=8)))
    assert "(model.dim: 4 -> 8);" in str(error.value)  # the one field, not the whole dict
    with pytest.raises(ValueError, match=r"\(train.learning_rate: 0.003 -> 0.1\);"):
        _tiny_run(tmp_path, steps=8, learning_rate=0.1)


def test_train_gpt_resumes_when_only_sampling_flags_change(tmp_path, capsys):
    workdir = ["--workdir", str(tmp_path)]
    assert train_gpt.main([*workdir, *TINY_GPT, "--steps", "1"]) == 0
    assert "starting fresh" in capsys.readouterr().out
    # Another KV cache size (prompt + sample tokens) and other intervals: the same run.
    flags = ["--steps", "1", "--log-every", "3", "--checkpoint-every", "7", "--prompt", "x" * 20]
    assert train_gpt.main([*workdir, *TINY_GPT, *flags]) == 0
    assert "resuming from step 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: .* other settings \(model.dim: 16 -> 32\)"):
        train_gpt.main([*workdir, *TINY_GPT, "--steps", "2", "--dim", "32"])  # no traceback


def test_short_runs_warm_up_over_a_tenth_of_the_steps(tmp_path, capsys):
    short = training.TrainConfig(steps=30, warmup_steps=30, learning_rate=1.0)
    assert training.warmup_steps(short) == 3
    schedule = training.learning_rate_schedule(short)
    values = np.array([float(schedule(s)) for s in range(31)])
    assert abs(values[3] - 1.0) < 1e-6 and np.all(np.diff(values[3:]) <= 1e-7)
    assert values[-1] < 0.2  # the run decays instead of ending at its peak
    long = dataclasses.replace(short, steps=300)
    assert training.warmup_steps(long) == 30
    _tiny_run(tmp_path, steps=4, warmup_steps=10)
    assert "--warmup-steps 10 is not less than --steps 4: warming up over 0 steps" in (
        capsys.readouterr().err
    )


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script", [gat, hganet, cganet])
def test_graph_scripts_help_names_the_module_and_every_default(script, capsys):
    text = _help(script.main, [], capsys)
    name = script.__name__  # models.gat, ...
    assert text.startswith(f"usage: python -m {name} ")
    assert f"    python -m {name} --dataset cora" in text  # the examples keep their lines
    parser = graph_training.parser(script.__doc__, script.DEFAULTS, prog=name)
    script.add_args(parser)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        help_text = parser._get_formatter()._expand_help(action)
        assert help_text, f"{action.option_strings[0]} has no help"
        if not isinstance(action, argparse._StoreTrueAction):
            assert "default" in help_text, f"{action.option_strings[0]}: {help_text!r}"


def test_missing_planetoid_folder_says_where_to_get_the_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gat.main(["--data-dir", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere does not exist" in err and "github.com/kimiyoung/planetoid" in err
    assert "--data-dir" in err and "Traceback" not in err


def test_train_tost_help_keeps_the_example_lines(capsys):
    text = _help(train_tost.main, ["vision"], capsys)
    assert "\n    python -m models.train_tost vision --attention tssa" in text
    assert "\n    python -m models.train_tost lm --attention softmax" in text
