#!/usr/bin/env bash
# One GPU session, one device call, under 10 minutes. In order, each step under its own time limit so a
# failing step costs only its own time:
#   1. the GPU-marked tests (CUDA training, torch eager and CUDA-graph runtime vs the CPU reference)
#   2. latency, synthetic resnet18-cifar bundle: torch eager (as trained and rewritten) vs CUDA graphs
#      (as trained, BN-folded, cuDNN-fused; fp32/bf16/fp16) at batch 1/8/64, the server end to end,
#      onnxruntime CUDA if present; two more batch-1 repeats; bars (a)-(c) on the host's CPU cores
#   3. the CIFAR-10 unlearning report (resnet18-cifar; forget vectors vs Retrain/FT/GA/RL), under a
#      time budget: stages that would not finish are skipped and listed as skipped (the full quality
#      report is benchmarks/quality_suite.sh, two calls of its own)
#   4. the trained model + vectors exported as a bundle, parity checked, latency on it
# Everything lands flat under $OUT, 7 files (the device tool brings back at most 8).
#
# Prepare here (the device machine has no network and does not get ../shared):
#   mkdir -p .data && cp ../shared/datasets/cifar10/cifar10-jpeg.tar.gz .data/     # .data/ is git-ignored
#   wheels the device image lacks (starlette, uvicorn, tritonclient[http] and its deps) into .whl/
#   (see /work/.library/device/README.md; .whl/ is ignored through .git/info/exclude)
# Then, through the device tool:
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".data", ".whl"], timeout_s=590)
set -uo pipefail
OUT=${OUT:-runs/gpu-suite}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
TOTAL=${TOTAL:-560}          # seconds this script may take in all
CLASSES=${CLASSES:-0,3}
PRESET=${PRESET:-cifar}      # class-wise vector recipe (cifar: the H200 sweep's best; paper: the paper's)
VECTOR_EPOCHS=${VECTOR_EPOCHS:-}  # empty: the preset's
EPOCHS=${EPOCHS:-}           # classifier epochs (empty: the arch default)
# overridable for a CPU smoke run of this script: DEVICE=cpu ARCH=cifar-small SUBSET=2000,500 RUNS=5 EPOCHS=1 ...
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-resnet18-cifar}
SUBSET=${SUBSET:-}
RUNS=${RUNS:-500}
OVERHEAD_ARCH=${OVERHEAD_ARCH:-digits-cnn,resnet18-cifar}
OVERHEAD_RUNS=${OVERHEAD_RUNS:-300}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 FORGETRT_CACHE_DIR=${FORGETRT_CACHE_DIR:-runs/cache} FORGETRT_CIFAR10=$DATA
T0=$SECONDS
exec > >(tee "$OUT/suite.log") 2>&1

. "$(dirname "$0")/suite_lib.sh"  # left, step

echo "== $(date -u) gpu_suite on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
$PY -c "import torch, onnx, onnxruntime as o, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', '| onnx', onnx.__version__, '| ort', o.__version__, o.get_available_providers(), '| numpy', numpy.__version__)"
$PY -c "import starlette, uvicorn, tritonclient.http; print('server stack ok')" || echo "server stack incomplete (server steps report it)"

step "GPU-marked tests" 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/train/test_gpu.py tests/runtime/test_gpu_runtime.py

step "latency (synthetic $ARCH)" 100 $PY benchmarks/gpu_latency.py --synthetic "$ARCH" --runs "$RUNS" --warmup $((RUNS / 10)) --json "$OUT/gpu_latency.json"
for r in 2 3; do  # batch-1 repeats: eager's p50 drifts with the host CPU between runs
  step "latency repeat $r (batch 1)" 45 $PY benchmarks/gpu_latency.py --synthetic "$ARCH" --batches 1 --no-server --runs "$RUNS" \
    --warmup $((RUNS / 10)) --json "$OUT/gpu_latency_r$r.json"
done

# bars (a)-(c) on this host's CPU cores (onnxruntime CPU), beside the 2-core numbers measured elsewhere
step "runtime overhead (onnxruntime CPU, $(nproc) cores)" 120 $PY benchmarks/runtime_overhead.py --arch "$OVERHEAD_ARCH" \
  --runs "$OVERHEAD_RUNS" --json "$OUT/runtime_overhead_cpu.json"

# the unlearning report gets what is left but 75 s for step 4
budget=$(($(left) - 75))
EP=()
[ -n "$EPOCHS" ] && EP+=(--epochs "$EPOCHS")
[ -n "$SUBSET" ] && EP+=(--subset "$SUBSET")
[ -n "$VECTOR_EPOCHS" ] && EP+=(--vector-epochs "$VECTOR_EPOCHS")
step "unlearning report (CIFAR-10, budget ${budget}s)" $((budget + 30)) $PY benchmarks/unlearning_report.py --data "cifar10:$DATA" \
  --arch "$ARCH" --preset "$PRESET" --random-preset paper --classes "$CLASSES" --baseline-classes "$CLASSES" \
  --fractions 0.1 --stages class,random,arithmetic \
  "${EP[@]}" --device "$DEVICE" --time-budget "$budget" --out runs/report-cifar
(cd runs/report-cifar 2>/dev/null && tar czf "$OUT/report.tgz" report.md report.json tradeoff.png 2>/dev/null)

if [ -f runs/report-cifar/model/model.json ] && [ -f runs/report-cifar/bank/manifest.json ]; then
  step "export trained bundle" 40 $PY -m forgetrt.tools.cli export onnx --model runs/report-cifar/model --bank runs/report-cifar/bank --out runs/cifar-bundle --overwrite
  step "parity (onnxruntime, torch)" 30 $PY -m forgetrt.tools.cli parity runs/cifar-bundle --backends onnxruntime,torch
  [ -d runs/cifar-bundle ] && step "latency (trained bundle)" 45 $PY benchmarks/gpu_latency.py --bundle runs/cifar-bundle --runs "$RUNS" --warmup $((RUNS / 10)) \
    --no-server --json "$OUT/gpu_latency_trained.json"
fi
echo "== done after $((SECONDS - T0))s $(date -u)"
