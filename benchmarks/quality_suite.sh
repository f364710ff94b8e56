#!/usr/bin/env bash
# Issue 10 (unlearning quality) on a GPU in ONE device call (a session has 15 minutes of device time,
# starts included). Every step runs under its own time limit and every report saves after each task, so
# an interrupted call keeps what finished.
#
#   1. the converged base model (resnet18-cifar, 10% of the training set held out for validation)
#   2. in parallel on the one GPU (each process its own report folder, all reusing the base model):
#      - class-wise vectors for all ten classes (no-vector and output-mask rows) + the arithmetic table,
#        once per candidate recipe in CANDIDATES
#      - Retrain/FT/GA/RL on BASE_CLASSES (with the first candidate's vector beside them)
#      - random 1% and 10%: Retrain, no vector, the vector as trained and calibrated, then FT/GA/RL
#
# Choosing between candidates is done afterwards on VALIDATION data only (the calibration grid each bank
# records): the candidate with the lowest mean validation accuracy drop among those that reached the UA
# target on validation for every class; test columns are read only for the chosen one's report.
#
# Prepare here (the device has no network and does not get ../shared):
#   mkdir -p .data && cp ../shared/datasets/cifar10/cifar10-jpeg.tar.gz .data/     # .data/ is git-ignored
# Then, through the device tool:
#   run(command="bash benchmarks/quality_suite.sh", carry=[".data"], timeout_s=600)
# Results: $OUT/quality.tgz (each report's md/json/png, the log).
set -uo pipefail
OUT=${OUT:-runs/quality-suite}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
TOTAL=${TOTAL:-575}               # seconds this call may take in all
# kd4: the cifar preset plus distillation; masked: the cifar-masked preset (kd4 with the masked-kd forget term at
# beta 40, which validation chose over kd4 on a cifar-small model on CPU, 2026-12-08, benchmarks/RESULTS.md)
CANDIDATES=${CANDIDATES:-"kd4=cifar:distill=4 masked=cifar-masked"}
RANDOM_PRESET=${RANDOM_PRESET:-paper}
BASE_CLASSES=${BASE_CLASSES:-0}   # classes Retrain/FT/GA/RL run on (each costs about two base-model trainings)
BASE_BUDGET=${BASE_BUDGET:-150}
EPOCHS=${EPOCHS:-}                # classifier epochs (empty: the arch default)
# a CPU smoke run of this script: DEVICE=cpu ARCH=cifar-small SUBSET=2000,500 EPOCHS=1 VECTOR_EPOCHS=1 ...
DEVICE=${DEVICE:-cuda}
ARCH=${ARCH:-resnet18-cifar}
SUBSET=${SUBSET:-}
VECTOR_EPOCHS=${VECTOR_EPOCHS:-}
R=runs/quality
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 FORGETRT_CACHE_DIR=${FORGETRT_CACHE_DIR:-runs/cache} FORGETRT_CIFAR10=$DATA
T0=$SECONDS
exec > >(tee "$OUT/quality.log") 2>&1

. "$(dirname "$0")/suite_lib.sh"  # left, step

echo "== $(date -u) quality_suite on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
COMMON=(--data "cifar10:$DATA" --arch "$ARCH" --device "$DEVICE")
[ -n "$EPOCHS" ] && COMMON+=(--epochs "$EPOCHS")
[ -n "$SUBSET" ] && COMMON+=(--subset "$SUBSET")
[ -n "$VECTOR_EPOCHS" ] && COMMON+=(--vector-epochs "$VECTOR_EPOCHS")

rm -rf "$R"
mkdir -p "$R"
step "base model" "$BASE_BUDGET" $PY benchmarks/unlearning_report.py "${COMMON[@]}" --stages none \
  --time-budget $((BASE_BUDGET - 10)) --out "$R/base"
MODEL="$R/base/model"
if [ -f "$MODEL/model.json" ]; then
  budget=$(($(left) - 25))
  first=""
  pids=()
  for c in $CANDIDATES; do
    name=${c%%=*} recipe=${c#*=}
    first=${first:-$recipe}
    step "class-wise + arithmetic, $name ($recipe)" "$budget" $PY benchmarks/unlearning_report.py "${COMMON[@]}" \
      --model "$MODEL" --preset "$recipe" --stages class,arithmetic --classes all --baseline-classes none \
      --time-budget $((budget - 20)) --out "$R/class-$name" >"$OUT/class-$name.log" 2>&1 &
    pids+=($!)
  done
  step "baselines on classes $BASE_CLASSES" "$budget" $PY benchmarks/unlearning_report.py "${COMMON[@]}" --model "$MODEL" \
    --preset "$first" --stages class --classes "$BASE_CLASSES" --baseline-classes "$BASE_CLASSES" \
    --time-budget $((budget - 20)) --out "$R/baselines" >"$OUT/baselines.log" 2>&1 &
  pids+=($!)
  step "random 1%, 10%" "$budget" $PY benchmarks/unlearning_report.py "${COMMON[@]}" --model "$MODEL" \
    --preset "$first" --random-preset "$RANDOM_PRESET" --stages random --fractions 0.01,0.1 \
    --time-budget $((budget - 20)) --out "$R/random" >"$OUT/random.log" 2>&1 &
  pids+=($!)
  while sleep 30; do  # progress while the parallel stages run
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
    echo "== [$((SECONDS - T0))s] $alive of ${#pids[@]} running; $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
    ((alive == 0)) && break
  done
  wait "${pids[@]}"  # (a bare wait would also wait for the tee above, which ends only with this script)
  for f in "$OUT"/class-*.log "$OUT"/baselines.log "$OUT"/random.log; do echo "== $f"; cat "$f"; done
fi
pack=$(mktemp -d)
for d in "$R"/*/; do
  n=$(basename "$d")
  mkdir -p "$pack/$n"
  cp "$d"/report.md "$d"/report.json "$d"/tradeoff.png "$pack/$n"/ 2>/dev/null
done
cp "$OUT"/*.log "$pack"/
tar czf "$OUT/quality.tgz" -C "$pack" .
echo "== done after $((SECONDS - T0))s $(date -u)"
