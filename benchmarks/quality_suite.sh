#!/usr/bin/env bash
# Issue 10 (unlearning quality) on a GPU, split over device calls that each stay under 10 minutes. The
# device keeps the working tree between calls while it is warm (call again within 30 s), so call 2
# reuses call 1's model and bank. Every step runs under its own time limit and the report saves after
# every stage, so an interrupted call keeps what finished.
#
#   CALL=1: the converged base model (resnet18-cifar, 10% held out), a short recipe sweep on one class
#           (the preset vs distillation variants), the ten class-wise vectors with the "no vector" and
#           "output mask" rows, Retrain/FT/GA/RL on BASE_CLASSES, the arithmetic table, and parity of the
#           trained bundle on real test images (torch and onnxruntime, serving options)
#   CALL=2: random 1% and 10%: no vector, Retrain, FT, GA, RL, the vector as trained and calibrated
#
# Prepare here (the device has no network and does not get ../shared):
#   mkdir -p .data && cp ../shared/datasets/cifar10/cifar10-jpeg.tar.gz .data/     # .data/ is git-ignored
# Then, through the device tool, back to back:
#   run(command="CALL=1 bash benchmarks/quality_suite.sh", carry=[".data"], timeout_s=590)
#   run(command="CALL=2 bash benchmarks/quality_suite.sh", carry=[".data"], timeout_s=590)
# Results: $OUT/quality-call$CALL.tgz (report.md/json, tradeoff.png, sweep.json, parity.json, log).
set -uo pipefail
OUT=${OUT:-runs/quality-suite}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
CALL=${CALL:-1}
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
TOTAL=${TOTAL:-560}               # seconds this call may take in all
PRESET=${PRESET:-cifar}           # class-wise recipe for the tables
RANDOM_PRESET=${RANDOM_PRESET:-paper}
BASE_CLASSES=${BASE_CLASSES:-0}   # classes Retrain/FT/GA/RL run on (each costs about two base-model trainings)
SWEEP_CLASS=${SWEEP_CLASS:-5}
SWEEP=${SWEEP:-"cifar=cifar kd4=cifar:distill=4 kd4-b30=cifar:distill=4,beta=30 kd4-aug=cifar:distill=4,augment=crop-flip"}
EPOCHS=${EPOCHS:-}                # classifier epochs (empty: the arch default)
# a CPU smoke run of this script: DEVICE=cpu ARCH=cifar-small SUBSET=2000,500 EPOCHS=1 VECTOR_EPOCHS=1 ...
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-resnet18-cifar}
SUBSET=${SUBSET:-}
VECTOR_EPOCHS=${VECTOR_EPOCHS:-}
REPORT=runs/report-quality
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 FORGETRT_CACHE_DIR=${FORGETRT_CACHE_DIR:-runs/cache} FORGETRT_CIFAR10=$DATA
T0=$SECONDS
exec > >(tee "$OUT/quality-call$CALL.log") 2>&1

. "$(dirname "$0")/suite_lib.sh"  # left, step

echo "== $(date -u) quality_suite call $CALL on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
COMMON=(--data "cifar10:$DATA" --arch "$ARCH" --preset "$PRESET" --random-preset "$RANDOM_PRESET" --device "$DEVICE" --out "$REPORT")
[ -n "$EPOCHS" ] && COMMON+=(--epochs "$EPOCHS")
[ -n "$SUBSET" ] && COMMON+=(--subset "$SUBSET")
[ -n "$VECTOR_EPOCHS" ] && COMMON+=(--vector-epochs "$VECTOR_EPOCHS")

if [ "$CALL" = 1 ]; then
  rm -rf "$REPORT"
  step "base model" 240 $PY benchmarks/unlearning_report.py "${COMMON[@]}" --stages none --time-budget 230
  if [ -f "$REPORT/model/model.json" ]; then
    RECIPES=()
    for r in $SWEEP; do
      if [ -n "$VECTOR_EPOCHS" ]; then
        case $r in *:*) r="$r,epochs=$VECTOR_EPOCHS" ;; *) r="$r:epochs=$VECTOR_EPOCHS" ;; esac
      fi
      RECIPES+=(--recipe "$r")
    done
    step "recipe sweep (class $SWEEP_CLASS)" 120 $PY benchmarks/vector_sweep.py --model "$REPORT/model" --data "cifar10:$DATA" \
      --classes "$SWEEP_CLASS" "${RECIPES[@]}" --device "$DEVICE" --bank runs/sweep-bank --json "$OUT/sweep.json" \
      ${SUBSET:+--subset "$SUBSET"}
    budget=$(($(left) - 60))
    step "class-wise + arithmetic (budget ${budget}s)" $((budget + 20)) $PY benchmarks/unlearning_report.py "${COMMON[@]}" \
      --model "$REPORT/model" --stages class,arithmetic --classes all --baseline-classes "$BASE_CLASSES" --time-budget "$budget"
    if [ -f "$REPORT/bank/manifest.json" ]; then
      step "export trained bundle" 30 $PY -m forgetrt.tools.cli export onnx --model "$REPORT/model" --bank "$REPORT/bank" \
        --vectors "$(seq -s, -f 'forget-%g' 0 9)" --out runs/quality-bundle --overwrite
      step "parity on real images (serving path)" 30 $PY -m forgetrt.tools.cli parity runs/quality-bundle --device "$DEVICE" \
        --data "cifar10:$DATA" --limit 1000 --json "$OUT/parity.json"
    fi
  fi
else
  step "random data-wise (1%, 10%)" $(($(left) - 10)) $PY benchmarks/unlearning_report.py "${COMMON[@]}" --model "$REPORT/model" \
    --stages random --fractions 0.01,0.1 --time-budget $(($(left) - 30))
fi
pack=$(mktemp -d)
cp "$REPORT"/report.md "$REPORT"/report.json "$REPORT"/tradeoff.png "$OUT"/sweep.json "$OUT"/parity.json "$pack"/ 2>/dev/null
cp "$OUT/quality-call$CALL.log" "$pack"/
tar czf "$OUT/quality-call$CALL.tgz" -C "$pack" .
echo "== done after $((SECONDS - T0))s $(date -u)"
