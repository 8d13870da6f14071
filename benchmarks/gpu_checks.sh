#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a machine with one CUDA device.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR [STEP ...]]
#
# OUT_DIR defaults to $OUT, else out/gpu. STEPs (default: quick):
#
#   quick = selfcheck targets pytest_gpu memcheck: one H100/H200 in under 8 minutes,
#           compile included. Prints one line per target,
#             PASS|FAIL|SKIP TARGET SUBJECT: MEASURE OP LIMIT (DETAIL)
#           (format and verdicts: benchmarks/speed_bench/checks.py; SKIP = not verified),
#           then "targets: N PASS, N FAIL, N SKIP". The exit status is the number of FAILs.
#   full  = speed nccl_one_rank: the whole speed grid and the NCCL run (another call: each
#           call to a lent machine is limited to 10 minutes).
#
# 1. selfcheck: benchmarks/selfcheck.py, the kernels' one-time self-verification (one
#    "SELF-CHECK ..." line per kernel family; SKIP when the file is absent). quick checks
#    what training runs within its budget: bf16 operands, W stored as float32 (autocast)
#    and as bf16 (about 44 compilations); float32 / float16 operands are left to the CUDA
#    tests (a SKIP line says so; `python benchmarks/selfcheck.py` checks them all);
# 2. targets: benchmarks/speed.py --preset quick: class-level fwd+bwd time <= 1.5x the
#    matmul floor measured in the same run and extra memory <= 1.5x (dW + dx), at B=1024,
#    D=512, C in {100k, 1M}, bf16 and autocast_bf16; pair-level CircleLoss at B=16384 <= 3x
#    its floor; the number of Triton kernel specialisations launched (compile time) <= 24.
#    Results in OUT_DIR/quick.{json,csv,md};
# 3. pytest_gpu: the CUDA tests (tests/gpu/test_gpu.py, TestGPU in tests/ops/test_class_lse_triton.py,
#    the retrieval benchmark's CUDA smoke test), log in OUT_DIR/pytest_gpu.log; it also
#    counts the kernel specialisations the tests launch, and holds them to a budget
#    (GPU_CHECKS_SPECIALISATIONS, default 60 in quick, and GPU_CHECKS_TEST_SECONDS, 150):
#    tests that would start past it are skipped ("budget: ..."), listed on a
#    "Skipped to fit the budget" line (speed_bench/pytest_plugin.py);
# 4. memcheck: compute-sanitizer's memcheck over the Triton kernels at odd shapes, a class
#    loss and the pair kernels in float32 and bf16 (the wgmma code), with
#    PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that an out-of-bounds access inside one of the
#    caching allocator's blocks is seen; SKIP without compute-sanitizer;
# 5. speed (full): the speed benchmark's default GPU grid, results in OUT_DIR/cuda.*;
# 6. nccl_one_rank (full): a one-rank NCCL run of the sharded loss's training example (one
#    GPU cannot host two NCCL ranks; what it can and cannot show: see the step below).
#
# CPU rehearsal (CI runs it: tests/gpu/test_gpu_checks_script.py): GPU_CHECKS_CPU=1 runs the
# same steps on the CPU, the kernels under TRITON_INTERPRET=1, at tiny sizes. Only the
# device differs: the time targets then FAIL (the interpreter is slow), tests that need a
# CUDA device skip (a CUDA-test step in which no test ran is a FAIL), and nccl_one_rank
# runs on gloo.
# Overrides, mainly for that test: GPU_CHECKS_SPEED_ARGS (appended to speed.py's flags in
# the targets and speed steps), GPU_CHECKS_PYTEST and GPU_CHECKS_MEMCHECK_PYTEST (test selections),
# GPU_CHECKS_SELFCHECK (the self-check script), GPU_CHECKS_WALL_LIMIT (seconds, 480).
#
# A bare GPU machine (a pip-installed CUDA torch, no network): build the wheel folder here
# with `bash benchmarks/device_wheels.sh` (PML, numpy, scipy, tqdm, pytest, hypothesis;
# about 52 MiB in .whl/) and carry .whl with the checkout: it is installed into
# /tmp/site first, and the checkout itself is on PYTHONPATH (no `pip install -e .`).
# Steps run even if an earlier one fails.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/gpu}}"
shift || true
requested="${*:-quick}"
steps=" ${requested} "
steps="${steps// quick / selfcheck targets pytest_gpu memcheck }"
steps="${steps// full / speed nccl_one_rank }"
mkdir -p "$out"
verdicts="$out/verdicts.txt"
: >"$verdicts"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PWD}:${PWD}/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="${PWD}:${PWD}/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
fi

cpu="${GPU_CHECKS_CPU:-0}"
if [[ $cpu == 1 ]]; then
    export TRITON_INTERPRET=1
    dev=cpu
    device=(--device cpu --threads 1)
    tiny=(--B 16 --D 32 --C 64,200 --pair-B 64 --pair-D 32 --repeats 2 --warmup 1)
    dist=(--backend gloo --num-classes 1000 --steps 5 --eval-batches 1 --threads 1)
    echo "device: cpu rehearsal (GPU_CHECKS_CPU=1, TRITON_INTERPRET=1, tiny sizes)" \
        | tee "$out/device.txt"
else
    dev=cuda
    device=(--device cuda)
    tiny=()
    dist=(--backend nccl --num-classes 100000 --steps 50)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/device.txt"
pytest_sel=(tests/gpu/test_gpu.py tests/ops/test_class_lse_triton.py tests/benchmarks/test_retrieval_benchmark.py
    -k "gpu or GPU or cuda")
memcheck_sel=(tests/gpu/test_gpu.py
    -k "(sparse_circle_cuda and 41x401 or pair_circle_triton_matches and self) and (float32 or bfloat16)")
extra_speed=()
# The overrides are shell words (quotes allowed), hence eval.
[[ -n ${GPU_CHECKS_PYTEST:-} ]] && eval "pytest_sel=(${GPU_CHECKS_PYTEST})"
[[ -n ${GPU_CHECKS_MEMCHECK_PYTEST:-} ]] && eval "memcheck_sel=(${GPU_CHECKS_MEMCHECK_PYTEST})"
[[ -n ${GPU_CHECKS_SPEED_ARGS:-} ]] && eval "extra_speed=(${GPU_CHECKS_SPEED_ARGS})"
selfcheck="${GPU_CHECKS_SELFCHECK:-benchmarks/selfcheck.py}"
selfcheck_args=(--dtype bfloat16 --storage float32,same)
[[ -n ${GPU_CHECKS_SELFCHECK_ARGS+x} ]] && eval "selfcheck_args=(${GPU_CHECKS_SELFCHECK_ARGS})"
budget_env=(PML_EXTRAS_SPECIALISATION_BUDGET="${GPU_CHECKS_SPECIALISATIONS:-60}"
    PML_EXTRAS_TEST_SECONDS_BUDGET="${GPU_CHECKS_TEST_SECONDS:-150}")
verdict() { python3 -m speed_bench.checks "$@" | tee -a "$verdicts"; }

failed=0
rc=0
step() {
    local name=$1
    shift
    [[ $steps == *" $name "* ]] || return 1
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "    exit status $rc ($((SECONDS - t0)) s), log $out/$name.log"
    [[ $rc == 0 ]] || failed=$((failed + 1))
    return 0
}
tail_if_failed() { [[ $rc == 0 ]] || tail -n "$2" "$out/$1.log"; }

if [[ -f $selfcheck ]]; then
    if step selfcheck python3 "$selfcheck" --device "$dev" --out "$out/selfcheck.json" \
        "${selfcheck_args[@]}"; then
        grep "^SELF-CHECK" "$out/selfcheck.log"
        tail_if_failed selfcheck 15 # the failing check's detail follows its line
        verdict selfcheck "$out/selfcheck.log" "$rc"
        if [[ " ${selfcheck_args[*]} " == *" --dtype bfloat16 "* ]]; then
            echo "SKIP selfcheck float32,float16 operands: - ? 0 failures (outside the quick" \
                "budget; the CUDA tests cover them; python benchmarks/selfcheck.py checks all)" \
                | tee -a "$verdicts"
        fi
    fi
elif [[ $steps == *" selfcheck "* ]]; then
    echo "SKIP selfcheck $selfcheck: - ? 0 failures (not in this tree)" | tee -a "$verdicts"
fi

# Setups that would start after 240 s are skipped (and FAIL), so that the call fits.
# The kernels' self-check has its own step above; skipping it here keeps its odd-shape
# specialisations out of the targets' compile count and first-call time.
if step targets env PML_EXTRAS_SKIP_KERNEL_CHECK=1 python3 benchmarks/speed.py --preset quick "${device[@]}" "${tiny[@]}" \
    --out "$out" --time-budget 240 --note "Run by benchmarks/gpu_checks.sh quick." \
    "${extra_speed[@]}"; then
    verdict targets "$out/targets.log" "$rc"
fi

if step pytest_gpu env "${budget_env[@]}" python3 -m pytest -q -p no:cacheprovider \
    -p speed_bench.pytest_plugin --maxfail=20 -rs "${pytest_sel[@]}"; then
    tail_if_failed pytest_gpu 30
    grep -E "^(Triton kernel specialisations|Skipped to fit the budget)" "$out/pytest_gpu.log"
    verdict pytest "$out/pytest_gpu.log" "$rc" --subject "${pytest_sel[0]}..."
fi

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
    | head -n 1)
if [[ $cpu == 1 ]]; then
    sanitizer="" # the interpreter runs on the host: nothing for the sanitizer to see
fi
if [[ -n $sanitizer ]]; then
    if step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
        --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider "${memcheck_sel[@]}"; then
        tail_if_failed memcheck 30
        verdict memcheck "$out/memcheck.log" "$rc"
    fi
elif step memcheck python3 -m pytest -q -p no:cacheprovider "${memcheck_sel[@]}"; then
    tail_if_failed memcheck 30
    verdict memcheck "$out/memcheck.log" "$rc" --no-sanitizer
fi

# Results are written after every setup, and setups that would start after 420 s are
# skipped, so a run under the device's 10-minute limit still returns what it measured.
if step speed env PML_EXTRAS_SKIP_KERNEL_CHECK=1 python3 benchmarks/speed.py "${device[@]}" "${tiny[@]}" --out "$out" \
    --time-budget 420 --note "Run by benchmarks/gpu_checks.sh." "${extra_speed[@]}"; then
    tail -n 30 "$out/speed.log"
    verdict exit speed "$out/speed.log" "$rc"
fi

# nccl_one_rank: one rank is what one GPU allows. It shows that the training script runs
# on CUDA under NCCL: set_device(LOCAL_RANK), DDP with device_ids, the sharded loss's
# CUDA path, predict and the evaluation's device-side counts (and, with --amp /
# --clip-grad-norm, fp16 autocast with GlobalGradScaler and clipping). At world size 1
# every collective of pml_extras is skipped, so it cannot show the loss's NCCL
# collectives, cross-rank gradients, matching collectives or hangs: gloo checks those in
# tests/distributed/test_distributed*.py; on NCCL they need a machine with 2+ GPUs.
if step nccl_one_rank python3 -m torch.distributed.run --standalone --nproc_per_node=1 \
    benchmarks/distributed_train.py "${dist[@]}"; then
    tail -n 10 "$out/nccl_one_rank.log"
    verdict exit nccl_one_rank "$out/nccl_one_rank.log" "$rc"
fi

if [[ " $requested " == *" quick "* ]]; then
    verdict elapsed "$SECONDS" "${GPU_CHECKS_WALL_LIMIT:-480}"
fi
echo "steps with a non-zero exit status: $failed"
python3 -m speed_bench.checks summary "$verdicts"
