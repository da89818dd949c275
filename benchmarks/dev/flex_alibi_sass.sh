# One device command (issue 16): the SASS of the Mosaic forward (`jattn_flash_forward`) with
# per-instruction execution counts (Nsight Compute's source page), for plain attention and for
# flex ALiBi (T = 8k, B = 1, N = 16, H = 128, bf16), written as CSV under $OUT; and the opcode
# table of each. Needs /tmp/alibi.py from flex_alibi_ncu.sh (written again here).
source benchmarks/gpu_env.sh
sed -n '/^cat > \/tmp\/alibi.py/,/^PY$/p' benchmarks/dev/flex_alibi_ncu.sh | sed '1d;$d' > /tmp/alibi.py
for run in "plain 0" "alibi 0"; do
  set -- $run
  timeout 120 ncu --clock-control none --section SourceCounters --section InstructionStats \
      --print-details all -k regex:jattn python3 /tmp/alibi.py $1 $2 > $OUT/details_$1.txt 2>&1
  timeout 120 ncu --clock-control none --section SourceCounters --page source --print-source sass \
      --csv -k regex:jattn python3 /tmp/alibi.py $1 $2 > $OUT/sass_$1.csv 2>&1
  echo "== $1: $(wc -l < $OUT/sass_$1.csv) lines"; head -c 600 $OUT/sass_$1.csv; echo
done
