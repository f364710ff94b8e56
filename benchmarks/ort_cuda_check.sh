#!/usr/bin/env bash
# Issue 14, item 2, for a session that has a GPU: onnxruntime's CUDA execution provider (onnxruntime-gpu)
# checked for parity against the PyTorch reference and timed at batch 1/8/64 beside the torch CUDA-graph
# backend. NOT YET RUN: written on a CPU-only session; expect to fix small things on its first run.
#
# The device image has CPU onnxruntime only, and the onnxruntime-gpu wheel (~255 MB) is larger than one
# call may carry (64 MiB), so it travels in parts on a machine kept warm (each call within 30 s):
#   here:   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d /tmp/ortgpu onnxruntime-gpu
#           (and any Requires-Dist the device lacks: unzip -p /tmp/ortgpu/*.whl '*/METADATA' | grep ^Requires-Dist)
#           for p in a b c d e; do mkdir -p .ortgpu/$p; done   # git-ignored (add /.ortgpu/ to .git/info/exclude)
#           split -b 55M /tmp/ortgpu/onnxruntime_gpu-*.whl /tmp/ortgpu/part.
#           put part.aa in .ortgpu/a, part.ab in .ortgpu/b, ... (one part per folder)
#   device: run(command="mkdir -p /tmp/ort && cp .ortgpu/a/* /tmp/ort/", carry=[".ortgpu/a"]), then b, c, ...
#           run(command="ORT_WHEEL_NAME=onnxruntime_gpu-<version>-...whl bash benchmarks/ort_cuda_check.sh", timeout_s=400)
# Results land in $OUT/ort_cuda.tgz (parity JSON, latency JSON, the log).
set -uo pipefail
OUT=${OUT:-runs/ort-cuda}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
TOTAL=${TOTAL:-380}
T0=$SECONDS
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
exec > >(tee "$OUT/ort_cuda.log") 2>&1
. "$(dirname "$0")/suite_lib.sh" # left, step

echo "== $(date -u) ort_cuda_check on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if [ -n "${ORT_WHEEL_NAME:-}" ] && compgen -G "/tmp/ort/part.*" >/dev/null; then
  cat /tmp/ort/part.* >"/tmp/ort/$ORT_WHEEL_NAME"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "/tmp/ort/$ORT_WHEEL_NAME" \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

step "synthetic resnet18-cifar bundle (random weights, 16 vectors)" 60 $PY -c "
import sys, pathlib; sys.path.insert(0, 'benchmarks')
from runtime_overhead import make_bundle
pathlib.Path('$OUT/bundle_path.txt').write_text(str(make_bundle('resnet18-cifar', 16, pathlib.Path('runs/ort-cuda-src'))))"
BUNDLE=$(cat "$OUT/bundle_path.txt" 2>/dev/null)
step "parity: onnxruntime CUDA and torch CUDA vs the PyTorch reference" 90 $PY -m forgetrt.tools.cli parity "$BUNDLE" \
  --backends onnxruntime,torch --device cuda --json "$OUT/parity_cuda.json"
for b in 1 8 64; do
  step "latency batch $b: onnxruntime CUDA (IOBinding) beside torch CUDA graphs" 60 $PY -m forgetrt.tools.cli bench "$BUNDLE" \
    --backend onnxruntime --device cuda --batch "$b" --duration 5 --warmup 1 --json "$OUT/bench_ort_b$b.jsonl"
  step "latency batch $b: torch CUDA graphs" 60 $PY -m forgetrt.tools.cli bench "$BUNDLE" \
    --backend torch --device cuda --batch "$b" --duration 5 --warmup 1 --json "$OUT/bench_torch_b$b.jsonl"
done
(cd "$OUT" && tar czf ort_cuda.tgz ./*.json ./*.jsonl ort_cuda.log 2>/dev/null)
echo "== done in $((SECONDS - T0)) s"
