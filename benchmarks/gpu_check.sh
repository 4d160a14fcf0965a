#!/usr/bin/env bash
# The GPU checks, run once on a CUDA machine from the repository root:  bash benchmarks/gpu_check.sh
#
# Steps, each under its own timeout so that a hang costs that step and not the run; every step runs whatever
# the ones before it did, and all statuses are reported at the end:
#   env            the device and the torch / triton / transformers versions
#   kernel_tests   the Triton kernels against their torch references, natively, in fp32, fp16 and bf16
#   offline        benchmarks/gpu_offline.py: workloads a and b with CUDA graphs and eager, transformers on (a),
#                  decode steps at batch 1-256                 -> benchmarks/results/gpu_offline.md
#   kernels_bench  benchmarks/kernels_bench.py                  -> benchmarks/results/gpu_kernels.md
#   moe            benchmarks/moe_bench.py: a random MoE against dense models of its active and total parameters,
#                  bf16, CUDA graphs                            -> benchmarks/results/moe_gpu.md
# (the end-to-end numbers come before the kernel benchmark: they are new, while gpu_kernels.md already holds an
# H200 run; gpu_offline.py rewrites its report after every result, so a timeout keeps what was measured).
# The run stays within GPU_CHECK_BUDGET seconds (default 460, for an 8-minute slot): a step's timeout is its own
# cap or the time left, whichever is smaller. Logs go to $LOG_DIR; with $OUT set, the results, the logs and the
# summary are copied there too (flat names, 9 files). PYTHON picks the interpreter (default python3), RESULTS_DIR
# the results directory (default benchmarks/results).
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-460}
RESERVE=5  # seconds kept for the summary and the copies
LOG_DIR=${LOG_DIR:-${TMPDIR:-/tmp}/tokenmill-gpu-check}
RESULTS=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$LOG_DIR" "$RESULTS"
rm -f "$LOG_DIR"/gpu_check_*.log
SUMMARY="$LOG_DIR/gpu_check_summary.txt"
: > "$SUMMARY"
START_MARK="$LOG_DIR/started"  # only results newer than this count as this run's
touch "$START_MARK"

failed=0

# step NAME CAP_SECONDS COMMAND...
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - SECONDS - RESERVE))
    local limit=$((cap < left ? cap : left))
    local log="$LOG_DIR/gpu_check_$name.log" start=$SECONDS status rc
    if ((limit < 3)); then
        status="SKIPPED (budget of ${BUDGET}s spent)"
        failed=1
    else
        echo "=== $name (timeout ${limit}s)"
        printf '+ %.300s\n' "${*//$'\n'/ }"
        # timeout signals the command's whole process group (pytest workers, Triton compilers), then kills it
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        case $rc in
            0) status="ok" ;;
            124 | 137) status="TIMEOUT (after ${limit}s)" ;;
            *) status="FAILED (exit $rc)" ;;
        esac
        ((rc == 0)) || failed=1
    fi
    local line
    line=$(printf '%-14s %-30s %4ds' "$name" "$status" $((SECONDS - start)))
    echo "=== $line"
    echo "$line" >> "$SUMMARY"
}

step env 30 "$PYTHON" -c '
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for pkg in ("triton", "transformers"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
assert torch.cuda.is_available(), "no CUDA device"
free, total = torch.cuda.mem_get_info()
print("device", torch.cuda.get_device_name(), "| GiB free", round(free / 2**30, 1), "of", round(total / 2**30, 1))
'
step kernel_tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_kernels_triton.py tests/test_kernels_reference.py tests/test_triton_moe.py
step offline 300 "$PYTHON" benchmarks/gpu_offline.py --workloads a,b --modes graphs,eager --transformers \
    --decode-batches 1,8,32,64,256 --out "$RESULTS/gpu_offline.md"
step kernels_bench 90 "$PYTHON" benchmarks/kernels_bench.py --repeat 10 --out "$RESULTS/gpu_kernels.md"
step moe 90 "$PYTHON" benchmarks/moe_bench.py --device cuda --dtype bfloat16 --streams 1,8,64 \
    --out "$RESULTS/moe_gpu.md"

echo
for f in gpu_kernels.md gpu_offline.md moe_gpu.md; do
    if [[ "$RESULTS/$f" -nt "$START_MARK" ]]; then
        echo "result: $RESULTS/$f" >> "$SUMMARY"
    else
        echo "result: $RESULTS/$f NOT written by this run" >> "$SUMMARY"
    fi
done
echo "total ${SECONDS}s of a ${BUDGET}s budget; logs in $LOG_DIR" >> "$SUMMARY"
echo "=== summary"
cat "$SUMMARY"

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp "$SUMMARY" "$LOG_DIR"/gpu_check_*.log "$OUT"/ 2>/dev/null
    for f in gpu_kernels.md gpu_offline.md moe_gpu.md; do
        if grep -q "^result: $RESULTS/$f\$" "$SUMMARY"; then cp "$RESULTS/$f" "$OUT/$f"; fi
    done
    echo "=== copied the summary, logs and results of this run to $OUT"
fi
exit $failed
