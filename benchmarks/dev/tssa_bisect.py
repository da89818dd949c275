"""Each case in a subprocess: which part of the causal scan kernel crashes on the GPU."""
import subprocess, sys
PRE = """
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import tssa as K
from jattn import reference
w = jax.random.normal(jax.random.key(0), (1, 4096, 8, 64), jnp.float32)
t = jnp.ones(8, jnp.float32); b = 0.01*jnp.ones((8, 4096))
"""
POST = """
y = K.token_statistics_attention(w, t, causal=True, denom_bias=b)
r = reference.token_statistics_attention(w, t, causal=True, denom_bias=b)
print('RESULT', float(jnp.max(jnp.abs(y-r))/jnp.max(jnp.abs(r))))
"""
CASES = {
  "full": "",
  "no_lookback": "K._look_back = lambda ticket, first, a, i: tuple(jnp.zeros(r.shape[1:], jnp.float32) for r in a)\n",
  "no_publish": "K._publish = lambda ref, index, value: None\nK._look_back = lambda ticket, first, a, i: tuple(jnp.zeros(r.shape[1:], jnp.float32) for r in a)\n",
}
for name, patch in CASES.items():
    p = subprocess.run([sys.executable, "-c", PRE + patch + POST], capture_output=True, text=True, timeout=150)
    err = "\n".join(l for l in p.stderr.splitlines() if "Warning" not in l)
    print("=====", name, "rc", p.returncode, p.stdout.strip()[-300:], "|", err[-1500:] if p.returncode else "", flush=True)
