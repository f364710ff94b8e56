#!/bin/bash
# Alternated A/B of runtime/server.py (2026-11-28): "base" = the version before the inference route moved
# ahead of Starlette (git show 96002fa:runtime/server.py > /tmp/fe/server_base.py), "new" = the version
# after (cp runtime/server.py /tmp/fe/server_new.py). Each round: the ASGI loop (asgi_loop.py), then a
# server with --workers 1 and 2 under wrk (wrk.sh, 1 and 64 connections, 5 s). Run from the repo root with
# the forgetrt-demo bundle built (`forgetrt demo`) and wrk unpacked in .wrk/ (see benchmarks/gpu_frontend.sh).
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$(dirname "$0")/../../.."
OUTD=${OUTD:-/tmp/fe/ab}; mkdir -p $OUTD
for round in 1 2; do
  for v in base new; do
    cp /tmp/fe/server_$v.py runtime/server.py
    .venv/bin/python $HERE/asgi_loop.py 2>/dev/null | tail -1 | sed "s/^/$v r$round asgi /" | tee -a $OUTD/asgi.txt
    for w in 1 2; do
      .venv/bin/python -m forgetrt.tools.cli --log-level warning serve forgetrt-demo/bundle --device cpu \
        --backend onnxruntime --threads 1 --model-name m --workers $w --port 8412 > $OUTD/server_${v}_$w.log 2>&1 &
      pid=$!
      for i in $(seq 60); do curl -sf localhost:8412/v2/health/ready >/dev/null && break; sleep 0.5; done
      $HERE/wrk.sh 8412 64 2 >/dev/null  # warm-up
      for c in 1 64; do
        echo "$v r$round workers=$w conns=$c $($HERE/wrk.sh 8412 $c 5)" | tee -a $OUTD/wrk.txt
      done
      kill -INT $pid; wait $pid 2>/dev/null
    done
  done
done
cp /tmp/fe/server_new.py runtime/server.py
