#!/bin/bash
# usage: wrk.sh PORT CONNS SECS: one wrk run through benchmarks/server_frontend.py's _wrk helper (JSON line)
cd "$(dirname "$0")/../../.."
.venv/bin/python - "$@" <<'PY'
import sys, json
sys.path.insert(0, "benchmarks")
from server_frontend import _wrk
print(json.dumps(_wrk(".wrk/root/usr/bin/wrk", "forgetrt-demo/bundle", int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))))
PY
