#!/usr/bin/env bash
# One prepared call on a CUDA machine (no network): install fxopt without dependencies, run the
# default and GPU test suites there (torch/triton versions of that machine), then the benchmarks
# that exist. Tables and logs go to $OUT when set (the device tool), else bench/results/gpu/.
#
#   bash bench/gpu_check.sh            # about 5 minutes on one H200
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stamp=$(date -u +%Y-%m-%dT%H:%MZ)

{
  echo "date: $stamp"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

$PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }

# Parallel where pytest-xdist is there (16 cores); the suite itself is the same as CI's.
xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n 8"
timeout 150 $PY -m pytest -q $xdist -p no:cacheprovider > "$OUT/pytest_default.txt" 2>&1
echo "default suite: exit $? -- $(tail -1 "$OUT/pytest_default.txt")"
timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider > "$OUT/pytest_gpu.txt" 2>&1
echo "gpu suite: exit $? -- $(tail -1 "$OUT/pytest_gpu.txt")"

# The command line end to end on the GPU.
FXOPT_CACHE_DIR=/tmp/fxopt-cache timeout 60 $PY -m fxopt optimize --target cuda --epochs 1 --no-prune \
  --no-progress > "$OUT/cli_cuda.txt" 2>&1
echo "fxopt optimize --target cuda: exit $?"

# Benchmarks that exist (later issues add kernels.py and models.py --target cuda).
if [ -f bench/kernels.py ]; then
  timeout 150 $PY bench/kernels.py --out "$OUT" > "$OUT/kernels.log" 2>&1; echo "kernels: exit $?"
fi
if [ -f bench/models.py ] && grep -q -- "--target" bench/models.py; then
  timeout 150 $PY bench/models.py --target cuda --out "$OUT" > "$OUT/models_cuda.log" 2>&1; echo "models --target cuda: exit $?"
fi
ls -la "$OUT"
