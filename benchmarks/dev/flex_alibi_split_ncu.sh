source benchmarks/gpu_env.sh
sed -n '/^cat > \/tmp\/alibi.py/,/^PY$/p' benchmarks/dev/flex_alibi_ncu.sh | sed '1d;$d' > /tmp/alibi.py
for run in "plain 1" "alibi 1"; do set -- $run; echo "== $1"
timeout 100 ncu --clock-control none --metrics gpu__time_duration.sum,smsp__inst_executed.sum,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_fma.sum,smsp__inst_executed_pipe_xu.sum,launch__registers_per_thread,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active -k regex:jattn python3 /tmp/alibi.py $1 $2 2>&1 | grep -E "sum|thread|pct"; done
timeout 120 ncu --clock-control none --section SourceCounters --page source --print-source sass --csv -k regex:jattn python3 /tmp/alibi.py alibi 1 > $OUT/sass_alibi_split.csv 2>&1
timeout 100 python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -q tests/test_flex.py -k "real_size_on_gpu and alibi_score_mod" 2>&1 | tail -1
