# One device command (issue 15, next step): the SASS of the causal TSSA kernels with each
# instruction's execution count, to see what the ~32 (Pi pass) and ~100-130 (backward logit, dw)
# instructions per element of w are. Nsight Compute's source page, one launch each, T = 64k,
# B = 1, default config; full listings under $OUT, the hottest lines printed.
source benchmarks/gpu_env.sh
cat > /tmp/one.py <<'PY'
import jax, jax.numpy as jnp
from pallas_kernels import tssa as k
w = jax.random.normal(jax.random.key(0), (1, 65536, 8, 64), jnp.bfloat16)
t = jnp.linspace(0.5, 1.5, 8)
f = lambda x: k.token_statistics_attention(x, t, causal=True)
jax.block_until_ready(jax.jit(lambda x, dy: jax.vjp(f, x)[1](dy))(w, w))
PY
for kernel in ${KERNELS:-tssa_fwd_pi tssa_bwd_dw}; do
    timeout 150 ncu --clock-control none --section SourceCounters --page source \
        --print-source sass --launch-count 1 -k "$kernel" python3 /tmp/one.py \
        > "$OUT/sass_$kernel.txt" 2>&1
    echo "== $kernel: $(wc -l < "$OUT/sass_$kernel.txt") lines"
    # opcode histogram of the listing (static), then the lines ncu ranks hottest
    grep -oE "^\s+[0-9a-f]+\s+\S+\s+([A-Z][A-Z0-9.]+)" "$OUT/sass_$kernel.txt" \
        | awk '{print $NF}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25
done
