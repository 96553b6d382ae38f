#!/usr/bin/env bash
# One prepared call on a CUDA machine (no network), about 6 minutes on one H200: install fxopt
# without dependencies; the default (CPU) test suite in the background while the GPU tests (the
# lowering and pipeline first, then the kernels) and the command line with --target cuda run;
# then the benchmarks, alone on the machine: bench/models.py --target cuda (ResNet-50) and
# bench/gpu_kernels.py (GEMM, conv, residual add + LayerNorm). Every step has a timeout and says how it ended; tables and logs go to $OUT
# when set (the device tool), else bench/results/gpu/. Without CUDA each step says so and the
# script still finishes.
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Compiled kernels on the GPU: the interpreter switches must be off (tests set them themselves).
unset TRITON_INTERPRET FXOPT_TRITON_ON_CPU
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}  # autotune results kept across steps
PY=${PYTHON:-python3}
stamp=$(date -u +%Y-%m-%dT%H:%MZ)
T0=$SECONDS
step() { echo "[$((SECONDS - T0))s] $*"; }

{
  echo "date: $stamp"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "NOTE: no CUDA device here; the GPU steps below skip or say so (nothing is measured)."
fi

timeout 120 $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
step "installed"

# The default suite (CPU tests, gpu ones deselected) in the background: parallel where
# pytest-xdist is there; it uses the CPUs, not the GPU.
xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n 6"
timeout -k 5 170 $PY -m pytest -q $xdist -m "not gpu" -p no:cacheprovider \
  > "$OUT/pytest_default.txt" 2>&1 &
default_pid=$!

# GPU tests: the lowering and the pipeline end to end first, then the kernels.
# (CUDA graphs: ResNet-18 fp16/int8 at batch 1 and 2, bitwise against the plain module; the
# extra time overlaps the default suite, which runs ~170 s in the background.)
timeout -k 5 105 $PY -m pytest -q -m gpu -p no:cacheprovider tests/passes/lower/test_triton.py \
  tests/passes/lower/test_triton_layer_norm.py tests/fxopt/test_gpu.py \
  tests/fxopt/infra/test_cudagraph.py > "$OUT/pytest_gpu_lowering.txt" 2>&1
step "gpu tests (lowering, pipeline, CUDA graphs): exit $? -- $(tail -1 "$OUT/pytest_gpu_lowering.txt")"

# The command line end to end on the GPU.
FXOPT_CACHE_DIR=/tmp/fxopt-cache timeout -k 5 40 $PY -m fxopt optimize --target cuda --epochs 1 \
  --no-prune --no-progress > "$OUT/cli_cuda.txt" 2>&1
step "fxopt optimize --target cuda: exit $? -- $(tail -1 "$OUT/cli_cuda.txt")"

timeout -k 5 50 $PY -m pytest -q -m gpu -p no:cacheprovider tests/triton_kernels \
  > "$OUT/pytest_gpu_kernels.txt" 2>&1
step "gpu tests (kernels): exit $? -- $(tail -1 "$OUT/pytest_gpu_kernels.txt")"

wait $default_pid
step "default suite (not gpu): exit $? -- $(tail -1 "$OUT/pytest_default.txt")"

# Benchmarks, alone on the machine (batch 256 first: the aims are stated there).
# Batch 1 also runs the CUDA-graph variants (torch.compile reduce-overhead, fxopt
# with_cuda_graphs): about 30 s more, most of it torch.compile's second first compile.
timeout -k 5 160 $PY bench/models.py --target cuda --batches 256 64 1 --budget-s 135 \
  --rep-ms 100 --calib-batches 2 --out "$OUT" > "$OUT/models_cuda.log" 2>&1
step "models --target cuda: exit $?"
grep -E "^\| resnet|^- resnet" "$OUT"/models-cuda-*.md 2>/dev/null | cut -c1-400
tail -3 "$OUT/models_cuda.log"

timeout -k 5 65 $PY bench/gpu_kernels.py --budget-s 50 --out "$OUT" > "$OUT/gpu_kernels.log" 2>&1
step "kernels: exit $?"
tail -5 "$OUT/gpu_kernels.log"
ls -la "$OUT"
step "done"
