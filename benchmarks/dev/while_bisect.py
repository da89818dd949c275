"""Which while-loop construct crashes the Pallas Triton compiler: each in a subprocess."""
import subprocess, sys
PRE = """
import jax, jax.numpy as jnp, functools
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
N, H, S = 8, 64, 4
def read(ref, k):
    return plt.atomic_add(ref, (k, pl.ds(0, N), pl.ds(0, H)), jnp.zeros((N, H), jnp.float32))
def ready_sum(x): return jnp.sum(jnp.where(x < 0.0, 1, 0)) == 0
def ready_min(x): return jnp.min(x) >= 0.0
def call(kernel):
    f = pl.pallas_call(kernel, grid=(S,), out_shape=[jax.ShapeDtypeStruct((S, N, H), jnp.float32)]*2, input_output_aliases={0: 1})
    r = jax.block_until_ready(f(jnp.ones((S, N, H))))
    print('RESULT', r[0][:, 0, 0])
"""
CASES = {
"volatile_min": """
def k(x_in, o_ref, x_ref):
    i = pl.program_id(0)
    def cond(c): return c[1] == 0
    def body(c):
        k, _, acc = c
        a = plt.load(x_ref.at[k], volatile=True); b = plt.load(x_ref.at[jnp.maximum(k - 1, 0)], volatile=True)
        ha, hb = ready_min(a), ready_min(b)
        acc = jnp.where(ha, acc + a, jnp.where(hb, acc + b, acc))
        k = jnp.where(ha | jnp.logical_not(hb), k, k - 1)
        return k, ha.astype(jnp.int32), acc
    _, _, x = lax.while_loop(cond, body, (i, jnp.int32(0), jnp.zeros((N, H), jnp.float32)))
    o_ref[i] = x
call(k)
""",
"cg_sum": """
def k(x_in, o_ref, x_ref):
    i = pl.program_id(0)
    def cond(c): return c[1] == 0
    def body(c):
        k, _, acc = c
        a = plt.load(x_ref.at[k], cache_modifier=".cg"); b = plt.load(x_ref.at[jnp.maximum(k - 1, 0)], cache_modifier=".cg")
        ha, hb = ready_sum(a), ready_sum(b)
        acc = jnp.where(ha, acc + a, jnp.where(hb, acc + b, acc))
        k = jnp.where(ha | jnp.logical_not(hb), k, k - 1)
        return k, ha.astype(jnp.int32), acc
    _, _, x = lax.while_loop(cond, body, (i, jnp.int32(0), jnp.zeros((N, H), jnp.float32)))
    o_ref[i] = x
call(k)
""",
"plain_min": """
def k(x_in, o_ref, x_ref):
    i = pl.program_id(0)
    def cond(c): return c[1] == 0
    def body(c):
        k, _, acc = c
        a = x_ref[k]; b = x_ref[jnp.maximum(k - 1, 0)]
        ha, hb = ready_min(a), ready_min(b)
        acc = jnp.where(ha, acc + a, jnp.where(hb, acc + b, acc))
        k = jnp.where(ha | jnp.logical_not(hb), k, k - 1)
        return k, ha.astype(jnp.int32), acc
    _, _, x = lax.while_loop(cond, body, (i, jnp.int32(0), jnp.zeros((N, H), jnp.float32)))
    o_ref[i] = x
call(k)
""",
"scalar_flag_spin": """
def k(x_in, o_ref, x_ref):
    i = pl.program_id(0)
    def cond(c): return c == 0
    def body(c): return plt.atomic_add(x_ref, (jnp.maximum(i - 1, 0), 0, 0), jnp.float32(0.0)).astype(jnp.int32)
    lax.while_loop(cond, body, jnp.int32(0))
    plt.debug_barrier()
    o_ref[i] = plt.load(x_ref.at[i], volatile=True)
call(k)
""",
"fori_min_of_atomic": """
def k(x_in, o_ref, x_ref):
    i = pl.program_id(0)
    def body(j, acc):
        a = read(x_ref, i)
        return acc + jnp.where(ready_min(a), a, 0.0)
    o_ref[i] = lax.fori_loop(0, 3, body, jnp.zeros((N, H), jnp.float32))
call(k)
""",
}
for name, body in CASES.items():
    p = subprocess.run([sys.executable, "-c", PRE + body], capture_output=True, text=True, timeout=100)
    err = "\n".join(l for l in p.stderr.splitlines() if "Warning" not in l)
    print("=====", name, "rc", p.returncode, p.stdout.strip()[-200:], "|", err[-400:] if p.returncode else "", flush=True)
