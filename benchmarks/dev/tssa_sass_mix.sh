# One device command (issue 15): what the causal TSSA kernels' instructions are. Nsight Compute's
# instruction mix (by pipe and by opcode) and stall reasons for the causal Pi pass and the
# backward's three kernels at T = 64k, B = 1 (default config), written under $OUT.
source benchmarks/gpu_env.sh
cat > /tmp/one.py <<'PY'
import jax, jax.numpy as jnp
from pallas_kernels import tssa as k
w = jax.random.normal(jax.random.key(0), (1, 65536, 8, 64), jnp.bfloat16)
t = jnp.linspace(0.5, 1.5, 8)
f = lambda x: k.token_statistics_attention(x, t, causal=True)
jax.block_until_ready(jax.jit(lambda x, dy: jax.vjp(f, x)[1](dy)[0])(w, w))
PY
pipes=smsp__inst_executed.sum,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_fma.sum,smsp__inst_executed_pipe_fmaheavy.sum,smsp__inst_executed_pipe_lsu.sum,smsp__inst_executed_pipe_xu.sum,smsp__inst_executed_pipe_cbu.sum,smsp__inst_executed_pipe_adu.sum,smsp__inst_executed_pipe_uniform.sum,smsp__sass_inst_executed_op_shared_ld.sum,smsp__sass_inst_executed_op_shared_st.sum,smsp__sass_inst_executed_op_global_ld.sum,smsp__sass_inst_executed_op_global_st.sum,smsp__sass_inst_executed_op_local_ld.sum,smsp__sass_inst_executed_op_local_st.sum,launch__registers_per_thread,gpu__time_duration.sum
timeout 150 ncu --clock-control none --metrics $pipes -k regex:"tssa_(fwd_pi|bwd)" python3 /tmp/one.py > $OUT/ncu_pipes.txt 2>&1
grep -vE "^==PROF|Warning|warn" $OUT/ncu_pipes.txt | grep -E "tssa|sum|thread|rror" | head -80
timeout 150 ncu --clock-control none --section InstructionStats --section WarpStateStats --print-details all \
    -k regex:"tssa_(fwd_pi|bwd_dw)" python3 /tmp/one.py > $OUT/ncu_mix.txt 2>&1
grep -vE "^==PROF" $OUT/ncu_mix.txt | tail -120
