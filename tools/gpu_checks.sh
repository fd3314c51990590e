#!/usr/bin/env bash
# Every GPU check of the MSDeformAttn op in one call (GPU time is scarce; about 5 minutes on an H200):
#   1. build the CUDA extension for the visible GPU (python -m models.ops.build --cuda; needs nvcc, else the
#      cuda backend is reported as not built and the rest still runs),
#   2. the op's tests on the GPU: tests/test_ms_deform_attn_cuda.py (compile, parity, gradcheck, dispatch) and,
#      when they exist, tests/test_ms_deform_attn_triton.py and tests/test_ms_deform_attn.py,
#   3. tools/gpu_checks.py: parity and fp64 gradcheck of cuda and triton against pytorch, speed of cuda / triton /
#      pytorch on DINO-sized encoder and decoder inputs in fp32, fp16 and bf16, a short AMP training run of the
#      tiny config per backend; the page goes to docs/benchmarks/msda_gpu.md and OUTPUT_DIR.
# Each step has its own time limit and a failing step does not stop the later ones; the exit status is 1 if any
# step failed. Logs and the page are written to OUTPUT_DIR.
# Usage: tools/gpu_checks.sh [OUTPUT_DIR]   (default: $OUT if set, else outputs/gpu_checks)
#        tools/gpu_checks.sh --dry-run [OUTPUT_DIR]   (CPU: step 3 only, tiny sizes, page in OUTPUT_DIR only)
# Environment: PYTHON (default: python), TORCH_EXTENSIONS_DIR (build cache, optional).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
python_bin="${PYTHON:-python}"
out_dir="${1:-${OUT:-outputs/gpu_checks}}"
mkdir -p "$out_dir"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTPUT_DIR/NAME.log, remember a failure
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$out_dir/$name.log"
    local status="${PIPESTATUS[0]}"
    if [[ "$status" != 0 ]]; then
        echo "gpu_checks: step '$name' failed with status $status (124: over its time limit)" >&2
        failed+=("$name")
    fi
}

if [[ "$dry_run" == 1 ]]; then
    step checks 600 "$python_bin" tools/gpu_checks.py --device cpu --tiny --backends pytorch cpu --repeats 1 \
        --amp-steps 1 --output "$out_dir/msda_gpu.md"
else
    if ! "$python_bin" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_checks: torch sees no CUDA device; run this on a GPU machine (or: $0 --dry-run)" >&2
        exit 2
    fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out_dir/gpu.txt"
    fi
    step build 300 "$python_bin" -m models.ops.build --cuda
    tests=(tests/test_ms_deform_attn_cuda.py)
    for extra in tests/test_ms_deform_attn_triton.py tests/test_ms_deform_attn.py; do
        [[ -f "$extra" ]] && tests+=("$extra")
    done
    step tests 240 "$python_bin" -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
    step checks 300 "$python_bin" tools/gpu_checks.py --device cuda --output docs/benchmarks/msda_gpu.md
    cp docs/benchmarks/msda_gpu.md "$out_dir/msda_gpu.md" 2>/dev/null || true
fi

if (( ${#failed[@]} )); then
    echo "gpu_checks: failed steps: ${failed[*]}; logs in $out_dir" >&2
    exit 1
fi
echo "gpu_checks: all passed; results in $out_dir"
