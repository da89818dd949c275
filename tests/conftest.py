"""Test setup: 8 CPU devices, strict rank promotion, the `gpu` marker, shared helpers."""

import gc
import importlib.util
import mmap
import os
import pathlib
import pkgutil
import zlib


def _cpu_only() -> bool:
    """No CUDA plugin of JAX installed (or JAX told to use the CPU): XLA compiles for the CPU."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return True
    try:
        import jax_plugins  # the namespace package of JAX's PJRT plugins, if any is installed
    except ImportError:
        return True
    return not any("cuda" in m.name for m in pkgutil.iter_modules(jax_plugins.__path__))


def _xla_defines(flag: str) -> bool:
    """Whether this jaxlib's XLA has `flag` (XLA aborts on an unknown flag in XLA_FLAGS): its
    name is in libjax_common.so's strings. Reads the library without importing jaxlib."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        return False
    try:
        with open(pathlib.Path(spec.origin).parent / "libjax_common.so", "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as lib:
                return lib.find(flag.encode()) >= 0
    except (OSError, ValueError):
        return False


# Must happen before JAX initialises its backends. On CPU, XLA's LLVM backend without its
# optimisation passes: the tests' programs are tiny and compiled once each, so compiling them
# costs more than running them (tests/test_reference.py: 73 s of CPU time down to 59 s). And
# XLA:CPU's older elemental fusion emitters instead of the MLIR fusion emitters, which compile
# slower (on an idle 2-core machine: 18 xla_chunked cases of test_implementation_matches_oracle
# 13.9 s -> 6.7 s; the Triton and Mosaic interpret-mode tests 71 s -> 48 s).
# XLA's own HLO passes and the code paths are the same; subprocesses the tests start inherit it.
flags = [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
if _cpu_only() and "xla_backend_optimization_level" not in flags[0]:
    flags.append("--xla_backend_optimization_level=0")
if (
    _cpu_only()
    and "xla_cpu_use_fusion_emitters" not in flags[0]
    and _xla_defines("xla_cpu_use_fusion_emitters")
):
    flags.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(flags).strip()
del flags

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# Float32 oracles and peers (jax.nn's XLA path) must not drop to TF32 on GPUs.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session):
    """Collect garbage now, then freeze what is left, while an xdist worker has not yet reported
    that it finished. pytest's cleanup afterwards runs five full collections, which can take over
    5 s with JAX's heap on a loaded 2-core machine; execnet interrupts a worker still busy 5 s
    after it is told to stop (SIGINT to itself), which ended runs that passed with
    `PytestUnraisableExceptionWarning: ... _xla_gc_callback ... KeyboardInterrupt`. pytest's
    check for unraisable exceptions still sees what this collection finds."""
    gc.collect()
    gc.freeze()


@pytest.fixture
def rng(request):
    """A NumPy generator per test, seeded from the test's name: distinct per test and the same in
    every process (str hash() is salted per process, so it is not used). Set JATTN_TEST_SEED to
    draw other inputs."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("JATTN_TEST_SEED", "0"))
    return np.random.default_rng(seed)
