source benchmarks/gpu_env.sh
python3 -m benchmarks.dev.tssa_passes --json $OUT/passes_262k.json 2>&1 | grep -v sweep | tail -30
python3 -m benchmarks.dev.tssa_passes --json $OUT/passes_16k.json --batch 2 --length 16384 2>&1 | grep -v sweep | tail -30
cat > /tmp/one.py <<'PY'
import jax, jax.numpy as jnp
from pallas_kernels import tssa as k
w = jax.random.normal(jax.random.key(0), (1, 262144, 8, 64), jnp.bfloat16)
t = jnp.linspace(0.5, 1.5, 8)
for causal in (False, True):
    jax.block_until_ready(jax.jit(lambda x: k.token_statistics_attention(x, t, causal=causal, config=k.Config(store_pi=True)))(w))
PY
timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum -k regex:tssa python3 /tmp/one.py > $OUT/ncu.txt 2>&1
grep -E "tssa|duration|bytes|throughput|registers|warps_active|inst_exec|ERR|rror" $OUT/ncu.txt | head -70
