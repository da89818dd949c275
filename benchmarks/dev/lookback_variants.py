"""Look-back variants of the one-pass causal TSSA forward, each in a subprocess (a compiler
crash kills only its own case): correctness vs the XLA reference, then forward times.

Run on the GPU: python3 benchmarks/dev/lookback_variants.py three_pass _look_back
(a name other than three_pass is a look-back function of pallas_kernels.tssa to patch in).
"""

import subprocess
import sys

CODE = """
import sys, jax, jax.numpy as jnp
from pallas_kernels import tssa as K
from jattn import reference
from benchmarks.tssa_variants import _time
name = sys.argv[1]
if name != 'three_pass':
    K._look_back = getattr(K, name)
def run(shape, dtype, cfg):
    w = jax.random.normal(jax.random.key(3), shape, dtype)
    t = jnp.linspace(0.5, 1.5, 8, dtype=jnp.float32)
    b = 0.01 * jax.random.normal(jax.random.key(4), (8, shape[1]))
    f = jax.jit(lambda w: K.token_statistics_attention(w, t, causal=True, denom_bias=b,
                                                         config=cfg))
    y, y2 = f(w), f(w)
    r = reference.token_statistics_attention(w.astype(jnp.float32), t, causal=True, denom_bias=b)
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
    rerun = float(jnp.max(jnp.abs(y.astype(jnp.float32) - y2.astype(jnp.float32))))
    ms = _time(f, w)
    print(f'RESULT {name} {shape} {jnp.dtype(dtype).name} {cfg.chunk_t} err={err:.2e} '
          f'rerun={rerun:.1e} {ms:.3f} ms {2 * w.nbytes / ms / 1e9:.2f} TB/s', flush=True)
single = name != 'three_pass'
run((2, 4099, 8, 64), jnp.float32, K.Config(single_pass=single))
for shape in ((8, 4096, 8, 64), (2, 65536, 8, 64), (1, 262144, 8, 64)):
    for chunk in ((64, 128, 256) if single else (None,)):
        run(shape, jnp.bfloat16, K.Config(single_pass=single, block_t=8, chunk_t=chunk))
"""

for name in sys.argv[1:]:
    proc = subprocess.run(
        [sys.executable, "-c", CODE, name], capture_output=True, text=True, timeout=200
    )
    out = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    err = "\n".join(line for line in proc.stderr.splitlines() if "Warning" not in line)
    tail = err[-800:] if proc.returncode else ""
    print("=====", name, "rc", proc.returncode, "\n" + out, "\n" + tail, flush=True)
