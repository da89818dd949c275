# One device command (issue 16): where the ALiBi score_mod's forward time goes against the plain
# kernel (T = 8k, B = 1, N = 16, H = 128, bf16, the table's config). Nsight Compute's instruction
# mix by pipe, spills, registers and warp stalls of the Mosaic forward (`jattn_flash_forward`)
# for plain attention and flex ALiBi with the scalar folding of `mod_tiles` off and on.
source benchmarks/gpu_env.sh
cat > /tmp/alibi.py <<'PY'
import sys
import jax, jax.numpy as jnp
import jattn
from pallas_kernels import mod_tiles
mod_tiles.FOLD_FACTORS = sys.argv[2] == "1"
q, k, v = (jax.random.normal(jax.random.key(i), (1, 8192, 16, 128), jnp.bfloat16) for i in range(3))
def alibi(score, b, h, q_idx, kv_idx):
    slope = jnp.exp2(-8.0 * (h + 1).astype(jnp.float32) / 16)
    return score - slope * jnp.abs(q_idx - kv_idx).astype(jnp.float32)
if sys.argv[1] == "plain":
    f = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="mosaic"))
else:
    f = jax.jit(lambda q, k, v: jattn.flex_attention(q, k, v, score_mod=alibi, implementation="mosaic"))
jax.block_until_ready(f(q, k, v))
PY
pipes=smsp__inst_executed.sum,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_fma.sum,smsp__inst_executed_pipe_fmaheavy.sum,smsp__inst_executed_pipe_lsu.sum,smsp__inst_executed_pipe_xu.sum,smsp__inst_executed_pipe_uniform.sum,smsp__sass_inst_executed_op_local_ld.sum,smsp__sass_inst_executed_op_local_st.sum,launch__registers_per_thread,gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
for run in "plain 0" "alibi 0" "alibi 1"; do
  set -- $run
  echo "== $1 fold=$2"
  timeout 100 ncu --clock-control none --metrics $pipes -k regex:jattn python3 /tmp/alibi.py $1 $2 > $OUT/ncu_$1_$2.txt 2>&1
  grep -vE "^==PROF|Warning|warn" $OUT/ncu_$1_$2.txt | grep -E "sum|thread|pct|rror" | head -20
done
for run in "plain 0" "alibi 0"; do
  set -- $run
  timeout 100 ncu --clock-control none --section WarpStateStats --section InstructionStats -k regex:jattn \
      python3 /tmp/alibi.py $1 $2 > $OUT/ncu_stalls_$1.txt 2>&1
done
grep -vE "^==PROF" $OUT/ncu_stalls_plain.txt | tail -40
grep -vE "^==PROF" $OUT/ncu_stalls_alibi.txt | tail -40
