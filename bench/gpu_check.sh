#!/usr/bin/env bash
# One prepared GPU session check (a few minutes on an H100/H200), run from the
# repository root:
#
#   OUT=runs/gpu bash bench/gpu_check.sh
#
# 1. the kernel tests with compiled Triton kernels (TRITON_INTERPRET=0: the CUDA cases),
# 2. bench/lookup_kernels.py at its full GPU shapes, with the launch-configuration
#    sweep at 2^20 rows (JSON in $OUT),
# 3. `knowedit train small` with accelerator=gpu, timed, beside the CPU recipe.
#
# Packages the GPU image lacks can be installed first from wheels in .whl/
# (see docs/benchmarks.md, "GPU lookup kernels"). Each step has its own time limit, and a failing
# step does not stop the next; the exit status is the number of failed steps.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=0

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 90
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --target /tmp/site . || exit 91
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/device.txt"

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - t0)) s ===" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

TRITON_INTERPRET=0 step kernel_tests 150 "$PY" -P -m pytest -q -p no:cacheprovider tests/kernel_tests
step lookup_bench 240 "$PY" bench/lookup_kernels.py ${NO_SWEEP:---sweep} --json-out "$OUT/bench_kernels.json"
[ -n "${SKIP_TRAIN:-}" ] || step train_small_gpu 120 knowedit train small accelerator=gpu logger=none \
    --out /tmp/small-gpu --quiet --json
exit "$failed"
