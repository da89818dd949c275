# Sourced by the redo_hidden device scripts (benchmarks/dev/*redo*_call.sh), after
# benchmarks/gpu_env.sh (which sets $out).

gpu_tests() {  # name, timeout, pytest arguments: -m gpu tests into $out/tests_NAME.txt
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 -m pytest -q -o addopts="-ra" -p no:cacheprovider -m gpu "$@" \
        > "$out/tests_$name.txt" 2>&1
    tail -3 "$out/tests_$name.txt"
}

redo_gpu_tests() {  # the -m gpu redo cases of test_visibility (forward and dq redo, compiled)
    gpu_tests redo 100 tests/test_visibility.py -k redo
}

ab() {  # json prefix, name, timeout, clean_hidden_ab arguments: one A/B in one process
    local prefix=$1 name=$2 seconds=$3
    shift 3
    timeout "$seconds" python3 -m benchmarks.dev.clean_hidden_ab \
        --json "$out/${prefix}_$name.json" --repeats 7 "$@" > "$out/ab_$name.txt" 2>&1
    grep -h '"ms"' "$out/ab_$name.txt" | cut -c1-160
}

switch_ab() {  # name, timeout, benchmarks.dev.switch_ab arguments: one A/B into $out/NAME.json
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 -m benchmarks.dev.switch_ab --json "$out/$name.json" "$@" \
        > "$out/ab_$name.txt" 2>&1
    grep -h '"ms"\|error' "$out/ab_$name.txt" | sed -E 's/"max_abs_diff".*"peer"/"peer"/' \
        | cut -c1-200
}

gpu_suite() {  # name, timeout, pytest arguments: -m gpu tests on 8 workers into $out/tests_NAME.txt
    # (about 20 s a case one at a time on the H200 host, nearly all compiling on its CPUs;
    # 8 workers ran 150 cases in 267 s in stop 46; -v names each case, so a cut run still says
    # which finished)
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 -m pytest -o addopts="-ra" -p no:cacheprovider -m gpu -n 8 \
        --dist worksteal --timeout 200 -v "$@" > "$out/tests_$name.txt" 2>&1
    echo "rc $?"; grep -c PASSED "$out/tests_$name.txt"
    grep -E "FAILED|ERROR|Timeout" "$out/tests_$name.txt" | head -20; tail -2 "$out/tests_$name.txt"
}
