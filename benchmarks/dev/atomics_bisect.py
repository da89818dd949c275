"""Which atomic construct crashes Pallas Triton on the GPU: each in a subprocess."""
import subprocess, sys
PRE = """
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
N, H, S = 8, 64, 4
def call(kernel, ins, outs, aliases):
    f = pl.pallas_call(kernel, grid=(S,), out_shape=outs, input_output_aliases=aliases)
    r = jax.block_until_ready(f(*ins)); print('RESULT', [x.ravel()[:4] for x in r]); return r
"""
CASES = {
"ticket": """
def k(c_in, o_ref, c_ref):
    t = plt.atomic_add(c_ref, (jnp.int32(0),), jnp.int32(1))
    o_ref[pl.program_id(0)] = t
call(k, [jnp.zeros((1,), jnp.int32)], [jax.ShapeDtypeStruct((S,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)], {0: 1})
""",
"ticket_static_index": """
def k(c_in, o_ref, c_ref):
    t = plt.atomic_add(c_ref, (0,), 1)
    o_ref[pl.program_id(0)] = t
call(k, [jnp.zeros((1,), jnp.int32)], [jax.ShapeDtypeStruct((S,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)], {0: 1})
""",
"vec_read": """
def k(x_in, o_ref, x_ref):
    i = pl.program_id(0)
    v = plt.atomic_add(x_ref, (i, pl.ds(0, N), pl.ds(0, H)), jnp.zeros((N, H), jnp.float32))
    o_ref[i] = v
call(k, [jnp.ones((S, N, H))], [jax.ShapeDtypeStruct((S, N, H), jnp.float32), jax.ShapeDtypeStruct((S, N, H), jnp.float32)], {0: 1})
""",
"vec_max": """
def k(x_in, x_ref):
    i = pl.program_id(0)
    plt.atomic_max(x_ref, (i, pl.ds(0, N), pl.ds(0, H)), jnp.full((N, H), 2.0, jnp.float32))
call(k, [-jnp.ones((S, N, H))], [jax.ShapeDtypeStruct((S, N, H), jnp.float32)], {0: 0})
""",
"vec_add_publish": """
def k(x_in, x_ref):
    i = pl.program_id(0)
    plt.atomic_add(x_ref, (i, pl.ds(0, N), pl.ds(0, H)), jnp.full((N, H), 2.0, jnp.float32))
call(k, [-jnp.ones((S, N, H))], [jax.ShapeDtypeStruct((S, N, H), jnp.float32)], {0: 0})
""",
"scalar_flag_while": """
def k(f_in, o_ref, f_ref):
    i = pl.program_id(0)
    def cond(c): return c == 0
    def body(c): return plt.atomic_add(f_ref, (jnp.maximum(i - 1, 0),), jnp.int32(0))
    lax.while_loop(cond, body, jnp.where(i == 0, 1, 0).astype(jnp.int32))
    o_ref[i] = i
    plt.atomic_add(f_ref, (i,), jnp.int32(1))
call(k, [jnp.zeros((S,), jnp.int32)], [jax.ShapeDtypeStruct((S,), jnp.int32), jax.ShapeDtypeStruct((S,), jnp.int32)], {0: 1})
""",
"vec_read_in_while": """
def k(x_in, o_ref, x_ref):
    i = pl.program_id(0)
    def cond(c): return c[0] < 3
    def body(c):
        n, acc = c
        v = plt.atomic_add(x_ref, (i, pl.ds(0, N), pl.ds(0, H)), jnp.zeros((N, H), jnp.float32))
        return n + 1, acc + v
    _, acc = lax.while_loop(cond, body, (jnp.int32(0), jnp.zeros((N, H), jnp.float32)))
    o_ref[i] = acc
call(k, [jnp.ones((S, N, H))], [jax.ShapeDtypeStruct((S, N, H), jnp.float32), jax.ShapeDtypeStruct((S, N, H), jnp.float32)], {0: 1})
""",
}
for name, body in CASES.items():
    p = subprocess.run([sys.executable, "-c", PRE + body], capture_output=True, text=True, timeout=120)
    err = "\n".join(l for l in p.stderr.splitlines() if "Warning" not in l)
    print("=====", name, "rc", p.returncode, p.stdout.strip()[-300:], "|", err[-600:] if p.returncode else "")
