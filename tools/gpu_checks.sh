#!/usr/bin/env bash
# Every GPU check of the MSDeformAttn op in one run, for a machine with a CUDA GPU and nvcc:
#   1. build the CUDA extension for the visible GPU (python -m models.ops.build --cuda),
#   2. the CUDA tests: sources compile for sm_80/sm_90, CUDA vs pytorch parity (forward + 3 gradients, fp64 and
#      fp32), gradcheck in fp64, 'auto' picks cuda, fp16/bf16 inputs,
#   3. the timings of the cuda backend vs the pytorch path (tools/bench_msda.py --device cuda).
# Usage: tools/gpu_checks.sh [OUTPUT_DIR]   (default: $OUT if set, else outputs/gpu_checks)
# Environment: PYTHON (default: python), TORCH_EXTENSIONS_DIR (build cache, optional).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python_bin="${PYTHON:-python}"
out_dir="${1:-${OUT:-outputs/gpu_checks}}"
mkdir -p "$out_dir"

if ! "$python_bin" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_checks: torch sees no CUDA device; run this on a GPU machine" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out_dir/gpu.txt"
fi

echo "== 1/3 build the CUDA extension for this GPU"
"$python_bin" -m models.ops.build --cuda 2>&1 | tee "$out_dir/build.log"

echo "== 2/3 CUDA tests (compile, parity, gradcheck, dispatch)"
"$python_bin" -m pytest tests/test_ms_deform_attn_cuda.py -v -rs 2>&1 | tee "$out_dir/tests.log"

echo "== 3/3 timings: cuda vs pytorch"
"$python_bin" tools/bench_msda.py --device cuda --repeats 20 --output "$out_dir/msda_cuda.md" 2>&1 \
    | tee "$out_dir/bench.log"

echo "gpu_checks: all passed; results in $out_dir"
