#!/usr/bin/env bash
# Issue 13's throughput bars on a GPU host, in one device call (about 4 minutes): resnet18-cifar (random
# weights, 16 vectors) served with torch + CUDA graphs, `forgetrt serve --workers 1,2,4,8`, REST driven by
# wrk at batch 1 from 1 and 64 connections (bars: >= 15,000 requests/s at 64 clients with p99 reported;
# a lone client's p50 within 0.3 ms of the in-process call), with each process's CPU per request.
#
# Prepare here (the device machine has no network):
#   echo /.whl/ >> .git/info/exclude; echo /.wrk/ >> .git/info/exclude
#   the server stack the device image lacks, as wheels for Python 3.12 into .whl/ (device README recipe):
#     starlette uvicorn httptools tritonclient python-rapidjson (the image has anyio, h11, uvloop, grpcio)
#   wrk: (mkdir -p .wrk && cd .wrk && apt-get download wrk libluajit-5.1-2 libluajit-5.1-common &&
#         for f in *.deb; do dpkg -x $f root; done && rm *.deb)
# Then: run(command="bash benchmarks/gpu_frontend.sh", carry=[".whl", ".wrk"], timeout_s=420)
set -uo pipefail
OUT=${OUT:-runs/gpu-frontend}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
ENGINE=${ENGINE:-cuda}            # cpu for a smoke run of this script
WORKERS=${WORKERS:-1,2,4,8}
CONC=${CONC:-1,64}
DURATION=${DURATION:-5}
WRK=${WRK:-.wrk/root/usr/bin/wrk}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
exec > >(tee "$OUT/gpu_frontend.log") 2>&1
echo "== $(date -u) gpu_frontend on $(hostname), $(nproc) cores"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
$PY -c "import starlette, uvicorn, httptools, uvloop; print('server stack ok')" || { echo "server stack missing"; exit 1; }
[ -x "$WRK" ] || { echo "no wrk at $WRK"; exit 1; }
ARCH=${ARCH:-resnet18-cifar}
BUNDLE=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from runtime_overhead import make_bundle; print(make_bundle('$ARCH', 16, Path('runs/gpu-frontend-bundle')))" | tail -1) \
  || { echo "bundle failed"; exit 1; }
echo "bundle $BUNDLE"
timeout 360 $PY benchmarks/server_frontend.py --bundle "$BUNDLE" --engine "$ENGINE" --wrk "$WRK" \
  --wrk-threads 4 --workers-compare "$WORKERS" --concurrency "$CONC" --duration "$DURATION" \
  --client-processes 4 --json "$OUT/gpu_frontend.json"
rc=$?
echo "== done $(date -u), rc $rc"
exit $rc
