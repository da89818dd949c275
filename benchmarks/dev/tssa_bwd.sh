# One device command (issue 15): forward + backward times of TSSA tilings beside XLA, then Nsight
# Compute's counters for every kernel of one forward + backward at T = 262k (both variants).
source benchmarks/gpu_env.sh
python3 -m benchmarks.tssa_variants --json $OUT/grad.json --no-check --grad \
    --lengths 16384 65536 262144 --configs ${CONFIGS:-default stored_pi b4 b4_w2 w8 stored_pi_b4} \
    2>&1 | tail -40
cat > /tmp/one.py <<'PY'
import jax, jax.numpy as jnp
from pallas_kernels import tssa as k
w = jax.random.normal(jax.random.key(0), (1, 262144, 8, 64), jnp.bfloat16)
t = jnp.linspace(0.5, 1.5, 8)
for causal in (False, True):
    f = lambda x: k.token_statistics_attention(x, t, causal=causal)
    jax.block_until_ready(jax.jit(lambda x, dy: jax.vjp(f, x)[1](dy)[0])(w, w))
PY
timeout 200 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum -k regex:"tssa" python3 /tmp/one.py > $OUT/ncu.txt 2>&1
grep -E "tssa|duration|registers|warps_active|inst_exec|throughput|shared|rror" $OUT/ncu.txt | head -80
