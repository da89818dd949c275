"""Multi-controller jattn.offload and ring attention: 2 local processes x 4 CPU devices under
jax.distributed (and, with -m gpu on a two-GPU machine, 2 processes x 1 GPU).

The same code as on one process (`tests/multihost_worker.py`) must give the same results as a
single process with all the devices.
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


def _run_processes(out: pathlib.Path, platform: str = "cpu") -> None:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)  # the worker asks for 4 devices itself
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(PROCESSES), str(i), str(out), platform],
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
        f"process {i} exited {p.returncode}:\n{log[-4000:]}"
        for i, (p, log) in enumerate(zip(procs, logs, strict=True))
        if p.returncode
    ]
    if failed:  # the whole log tails (an assert's repr would cut them short)
        pytest.fail("\n\n".join(failed), pytrace=False)


def _compare(got, want: dict, tolerance: float) -> None:
    assert set(want) == set(got.files) - {"devices"}
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=tolerance, atol=tolerance, err_msg=name)
    # Sanity: the results are real attention outputs, not zeros everywhere.
    assert np.abs(want["sequence_out"][1:]).max() > 0.01
    assert np.isneginf(want["heads_lse"][0]).all() and (want["heads_out"][0] == 0).all()
    for name in ("ring_out", "ring_dq", "ring_dk", "ring_dv"):
        assert np.abs(want[name]).max() > 0.01, name


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "multihost.npz"
    _run_processes(out)
    got = np.load(out)
    assert int(got["devices"]) == 8
    _compare(got, multihost_worker.compute(), 1e-6)  # this process: 8 devices (conftest.py)


@pytest.mark.gpu
def test_two_gpu_processes_equal_one_process(tmp_path):
    """2 processes x 1 GPU (jax.distributed) against this process driving both GPUs."""
    import jax

    if jax.default_backend() != "gpu" or jax.device_count() < PROCESSES:
        pytest.skip(f"needs {PROCESSES} GPUs")
    out = tmp_path / "multihost.npz"
    _run_processes(out, "gpu")
    got = np.load(out)
    assert int(got["devices"]) == PROCESSES
    _compare(got, multihost_worker.compute(), 1e-5)
