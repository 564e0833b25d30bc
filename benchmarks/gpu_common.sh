# Sourced by the GPU scripts (gpu_suite.sh, gpu_decode.sh): where results go, which Python, and `part`, which runs
# one check under its own time limit so that one slow part cannot hide the others.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
part() {  # part NAME SECONDS CMD...  (SECONDS 0 skips it; TAIL lines of its output are shown, all in $OUT/NAME.log)
  local name=$1 limit=$2; shift 2
  [ "$limit" = 0 ] && { echo "=== $name: skipped"; return; }
  echo "=== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^WARNING\|Warning\|warnings.warn\|_warn_once\|^$" \
    | tail -${TAIL:-40}
  echo "=== $name: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s"
}
