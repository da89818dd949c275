# Sourced by the device scripts (benchmarks/gpu_*.sh), from the repository root with .whl
# carried: installs the wheels the GPU machine lacks (jraph, which jattn imports; tokamax and its
# dependencies; the xprof stub tokamax imports) and sets $out (= $OUT, else ./gpu_out) and the
# environment for JAX.
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && cp -r .whl/stub/xprof /tmp/site/
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
