#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a machine with one CUDA device.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR [STEP ...]]
#
# OUT_DIR defaults to $OUT, else out/gpu. STEPs (default: all four, in this order) are
# pytest_gpu, speed, nccl_one_rank and memcheck; name a subset to fit one call's time limit.
#
# 1. the CUDA tests (tests/test_gpu.py, TestGPU in tests/test_class_lse_triton.py and the
#    retrieval benchmark's CUDA smoke test), log in OUT_DIR/pytest_gpu.log;
# 2. the speed benchmark on the issue's grid (B=1024, D=512, C in {100k, 1M}, bf16 and
#    fp32; pair level B=16384), results in OUT_DIR/cuda.{json,csv,md};
# 3. a one-rank NCCL run of the sharded loss's training example (one GPU cannot host two
#    NCCL ranks; multi-GPU runs need a bigger machine);
# 4. compute-sanitizer's memcheck over the Triton kernels at odd shapes (out-of-bounds
#    loads that the CPU interpreter cannot see), when compute-sanitizer is installed.
#
# Missing Python packages (pytorch-metric-learning on the lent machines) can be carried as
# wheels in .whl/: they are installed into /tmp/site first. Steps run even if an earlier
# one fails; the exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/gpu}}"
shift || true
steps=" ${*:-pytest_gpu speed nccl_one_rank memcheck} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
fi
failed=0
step() {
    local name=$1
    shift
    [[ $steps == *" $name "* ]] || return 0
    echo "=== $name: $*"
    local t0=$SECONDS
    if "$@" >"$out/$name.log" 2>&1; then
        echo "    ok ($((SECONDS - t0)) s)"
    else
        echo "    FAILED ($((SECONDS - t0)) s); tail of $out/$name.log:"
        tail -n 40 "$out/$name.log"
        failed=$((failed + 1))
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/device.txt"

step pytest_gpu python3 -m pytest -q -p no:cacheprovider --maxfail=20 \
    tests/test_gpu.py tests/test_class_lse_triton.py tests/test_retrieval_benchmark.py \
    -k "gpu or GPU or cuda" -rs
[[ -f $out/pytest_gpu.log ]] && grep -E "passed|failed" "$out/pytest_gpu.log" | tail -n 1

# Results are written after every setup, and setups that would start after 420 s are
# skipped, so a run under the device's 10-minute limit still returns what it measured.
step speed python3 benchmarks/speed.py --device cuda --out "$out" --time-budget 420 \
    --note "Run by benchmarks/gpu_checks.sh."
[[ -f $out/speed.log ]] && tail -n 30 "$out/speed.log"

step nccl_one_rank python3 -m torch.distributed.run --standalone --nproc_per_node=1 \
    benchmarks/distributed_train.py --backend nccl --num-classes 100000 --steps 50
[[ -f $out/nccl_one_rank.log ]] && tail -n 5 "$out/nccl_one_rank.log"

if command -v compute-sanitizer >/dev/null; then
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        -k "(op_triton_matches and (41x128x401 or 7x100x1271) or pair_circle_triton) and float32"
    [[ -f $out/memcheck.log ]] && tail -n 5 "$out/memcheck.log"
fi

echo "failed steps: $failed"
exit "$failed"
