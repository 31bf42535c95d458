#!/usr/bin/env bash
# GPU check (issue 10): the Triton LoRA kernels vs the torch reference on CUDA, then the serving
# trace on CUDA. Prints a short summary; full logs go to $GPU_CHECK_DIR. Record the summary in
# docs/benchmarks.md ("GPU check").
#
#   bash benchmarks/gpu_check.sh                       # from anywhere; runs in the repo root
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh   # a venv other than .venv (CUDA torch + triton)
#   TRACE_ARGS="--adapters 100 --requests 32" bash benchmarks/gpu_check.sh   # smaller trace
#
# Steps (each under a timeout; exit status 0 only if all pass):
#   0. environment: CUDA visible to torch, torch / CUDA / triton versions, device name
#   1. tests/ops/test_ops_lora_triton.py -m cuda: BGMV / SGMV / dispatch vs add_lora_ref,
#      fp32 / fp16 / bf16, mixed ranks, slot -1 rows. Fails if any test is SKIPPED (no silent pass).
#   2. the other cuda-marked tests (merging on the device)
#   3. benchmarks/trace.py --device cuda (default: 1000 adapters, bf16, vs base-only and HF + PEFT);
#      the first steps include Triton's JIT compilation of the kernels.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=${GPU_CHECK_DIR:-${OUT:-/tmp}/adapterkit-gpu-check}
TRACE_ARGS=${TRACE_ARGS:---dtype bfloat16}
mkdir -p "$DIR"
declare -a SUMMARY=()
status=0
note() { SUMMARY+=("$1"); echo "$1"; }

echo "== 0. environment"
if ! "$PY" - > "$DIR/env.log" 2>&1 <<'EOF'
import sys

import torch
import triton

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: no CUDA device (or a CPU-only torch build)")
print(f"device: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)")
EOF
then
    cat "$DIR/env.log"
    echo "GPU check NOT run: no usable CUDA torch + triton in $PY" >&2
    exit 2
fi
cat "$DIR/env.log"
note "env: $(tr '\n' ' ' < "$DIR/env.log")"

run_pytest() {  # name, log, files...
    local name=$1 log=$2
    shift 2
    timeout 900 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs "$@" > "$log" 2>&1
    local rc=$? line
    line=$(grep -E "(passed|failed|error|no tests ran)" "$log" | tail -1)
    if [ $rc -eq 0 ] && ! grep -q "skipped" <<< "$line"; then
        note "$name: PASS ($line)"
    else
        note "$name: FAIL rc=$rc ($line); see $log"
        tail -40 "$log"
        status=1
    fi
}

echo "== 1. Triton kernels vs the torch reference (CUDA)"
run_pytest "kernels vs reference" "$DIR/kernels.log" tests/ops/test_ops_lora_triton.py

echo "== 2. other cuda-marked tests"
run_pytest "other cuda tests" "$DIR/cuda_other.log" tests/compose/test_merge.py tests/methods/test_merge_dtype_device.py

echo "== 3. trace on CUDA: benchmarks/trace.py --device cuda $TRACE_ARGS"
# shellcheck disable=SC2086  # TRACE_ARGS is a list of options
timeout 1200 "$PY" benchmarks/trace.py --device cuda $TRACE_ARGS 2>&1 | grep -v -i "warn" | tee "$DIR/trace.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
    note "trace: PASS; $(grep -E "ratio|speed-up" "$DIR/trace.log" | sed 's/^ *//' | tr '\n' ';')"
else
    note "trace: FAIL rc=$rc; see $DIR/trace.log"
    status=1
fi

echo
echo "== GPU check summary ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
printf '  %s\n' "${SUMMARY[@]}"
echo "  logs: $DIR"
exit $status
