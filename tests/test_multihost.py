"""Multi-controller jattn.offload: 2 local processes x 4 CPU devices under jax.distributed.

The same code as on one process (`tests/multihost_worker.py`) must give the same results as a
single process with 8 devices.
"""

import os
import pathlib
import socket
import subprocess
import sys

import multihost_worker
import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parents[1]
PROCESSES = 2
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_processes(out: pathlib.Path) -> None:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)  # the worker asks for 4 devices itself
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(PROCESSES), str(i), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"multi-process run did not finish in {TIMEOUT_S} s")
    failed = [
        (p.returncode, log[-3000:]) for p, log in zip(procs, logs, strict=True) if p.returncode
    ]
    assert not failed, failed


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "multihost.npz"
    _run_processes(out)
    got = np.load(out)
    assert int(got["devices"]) == 8
    want = multihost_worker.compute()  # this process: 8 devices (tests/conftest.py)
    assert set(want) == set(got.files) - {"devices"}
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    # Sanity: the results are real attention outputs, not zeros everywhere.
    assert np.abs(want["sequence_out"][1:]).max() > 0.01
    assert np.isneginf(want["heads_lse"][0]).all() and (want["heads_out"][0] == 0).all()
