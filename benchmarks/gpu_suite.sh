#!/usr/bin/env bash
# One GPU session, one device call, under 10 minutes: train resnet18-cifar on CIFAR-10, train a class
# vector and Retrain, export the bundle, run the GPU-marked tests, and time torch eager vs CUDA graphs
# (and onnxruntime CUDA if present) plus the server end to end. Everything lands flat under $OUT
# (the device tool brings back at most 8 files).
#
# Prepare here (the device machine has no network and does not get ../shared):
#   mkdir -p .data && cp ../shared/datasets/cifar10/cifar10-jpeg.tar.gz .data/   # .data/ is git-ignored
# Then, through the device tool:
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".data"], timeout_s=590)
set -uo pipefail
OUT=${OUT:-runs/gpu-suite}
mkdir -p "$OUT"
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
EPOCHS=${EPOCHS:-18}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
log="$OUT/suite.log"
{
  echo "== $(date -u) gpu_suite"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  python -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ort providers', o.get_available_providers())"

  echo "== GPU-marked tests"
  timeout 150 python -m pytest -q -m "gpu" tests/train/test_gpu.py tests/export/test_bundle_export.py 2>&1 | tail -15

  echo "== unlearning benchmark (resnet18-cifar, $EPOCHS epochs)"
  timeout 330 python benchmarks/unlearning_cifar10.py --data "$DATA" --epochs "$EPOCHS" --classes 0 --out runs/gpu-cifar --device cuda
  cp runs/gpu-cifar/results.json "$OUT/unlearning_cifar10.json" 2>/dev/null
  cp runs/gpu-cifar/results.md "$OUT/unlearning_cifar10.md" 2>/dev/null

  echo "== export + latency"
  if [ -d runs/gpu-cifar/model ]; then
    timeout 60 python -m forgetrt.tools.cli export onnx --model runs/gpu-cifar/model --bank runs/gpu-cifar/bank --out runs/gpu-cifar/bundle --overwrite
    timeout 120 python benchmarks/gpu_latency.py --bundle runs/gpu-cifar/bundle --json "$OUT/gpu_latency.json"
    timeout 60 python -m forgetrt.tools.cli bench runs/gpu-cifar/bundle --backend torch --device cuda --batch 1,32,256 --concurrency 1,16 \
      --duration 3 --warmup 1 --json "$OUT/bench_torch_cuda.jsonl" --plot "$OUT/bench_torch_cuda.png"
  fi
  echo "== done $(date -u)"
} 2>&1 | tee "$log"
