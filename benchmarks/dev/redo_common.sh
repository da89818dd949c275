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
