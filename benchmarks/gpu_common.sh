# Sourced by the GPU scripts (gpu_suite.sh, gpu_decode.sh): where results go, which Python; `need_gpu`, which stops
# the script at once (exit 2) when that Python sees no CUDA device; `part`, which runs one check under its own time
# limit so that one slow part cannot hide the others; and `finish`, which names the parts that failed or ran out of
# time and exits 1 if any did (0 otherwise).
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
FAILED=()
need_gpu() {  # the parts would otherwise fail one by one, or run for minutes on the CPU, and the script exit 0
  $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "$0: no CUDA device visible to $PY (torch.cuda.is_available() is False): these checks need a GPU" >&2
    exit 2
  }
}
part() {  # part NAME SECONDS CMD...  (SECONDS 0 skips it; TAIL lines of its output are shown, all in $OUT/NAME.log)
  local name=$1 limit=$2; shift 2
  [ "$limit" = 0 ] && { echo "=== $name: skipped"; return; }
  echo "=== $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^WARNING\|Warning\|warnings.warn\|_warn_once\|^$" \
    | tail -${TAIL:-40}
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 ))s"
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc$([ "$rc" = 124 ] && echo ", out of time"))")
}
finish() {  # the last line of a GPU script: every part passed (exit 0), or the ones that did not (exit 1)
  if [ ${#FAILED[@]} -gt 0 ]; then
    local list
    list=$(printf '%s, ' "${FAILED[@]}")
    echo "=== ${#FAILED[@]} part(s) failed: ${list%, }; logs in $OUT" >&2
    exit 1
  fi
  echo "=== every part passed; logs in $OUT"
}
