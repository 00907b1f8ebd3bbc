# Time-boxed steps for gpu_check.sh (sourced; tests/test_gpu_steps.py checks them).
# Needs START (epoch seconds) and BUDGET (seconds for the whole script); MIN_STEP (default
# 20) is the least time worth starting a step with. STEPS (optional, space-separated names)
# runs only the steps it names (a rerun of what failed); the others are passed over, unlisted.
FAILED=() SKIPPED=()
step() { echo; echo "=== [$(( $(date +%s) - START )) s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
wanted() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
check() {  # check NAME SECONDS COMMAND...: runs a step with a time limit, records failures
  local name=$1 limit=$2 rest
  shift 2
  wanted "$name" || return 0
  rest=$(left)
  (( rest < limit )) && limit=$rest
  if (( limit < ${MIN_STEP:-20} )); then
    step "$name skipped: ${rest} s of the ${BUDGET} s budget left"
    SKIPPED+=("$name")
    return 0
  fi
  step "$name (limit ${limit} s)"
  timeout --kill-after=5 "$limit" "$@" || { echo "!!! $name failed ($?)"; FAILED+=("$name"); }
}
