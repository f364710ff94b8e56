# Shared by the device suites (gpu_suite.sh, quality_suite.sh); source it after setting TOTAL and T0.
# left: seconds this call has left. step NAME LIMIT CMD...: run CMD under min(LIMIT, time left), log its
# start, end and exit status, never abort the suite (a failing step costs only its own time).
left() { echo $((TOTAL - (SECONDS - T0))); }
step() {
  local name=$1 limit=$2
  shift 2
  local l
  l=$(left)
  ((limit > l)) && limit=$l
  if ((limit < 10)); then
    echo "== SKIP $name: ${l}s left"
    return 0
  fi
  echo "== [$((SECONDS - T0))s] $name (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "== [$((SECONDS - T0))s] $name: exit $rc"
}
