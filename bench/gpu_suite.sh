#!/usr/bin/env bash
# One command that proves the kernels on a GPU: build, test, sanitize, benchmark, record.
#
#   bench/gpu_suite.sh [--out DIR] [--budget 20m] [--core-only|--bench-only] [--dry-run]
#
# On a machine with an NVIDIA GPU, torch with CUDA and no network:
#   core   1. build the extension in place for this GPU's architecture only
#          2. run the whole test suite on CUDA (junit.xml)
#          3. compute-sanitizer memcheck and racecheck on bench/sanitize_cases.py
#   bench  4. microbenchmarks (bench/test_*.py, pytest-benchmark) and bench/e2e.py, within --budget
#   always 5. results.json + summary.md in the out folder (bench/collect_results.py)
# The core is meant to fit in 10 minutes on an H100 (--core-budget, default 9m30s); the benchmarks
# are separately callable (--bench-only) and use the same folder, so results.json holds both.
# --dry-run checks this script's own logic on a machine without a GPU (no GPU step runs).
# bench/results/README.md describes the files and the folder naming.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/bench/$(basename "${BASH_SOURCE[0]}")"
cd "$REPO"

usage() {
  cat <<'EOF'
usage: bench/gpu_suite.sh [--out DIR] [--budget 20m] [--core-only|--bench-only] [--dry-run]
                          [--core-budget 9m30s] [--rebuild] [--archive FILE.tgz]

  --out DIR          results folder (default bench/results/<UTC date>-<gpu slug>/; reused the same day)
  --budget T         time for the benchmarks: 90s, 20m, 1h30m or plain seconds (default 20m)
  --core-budget T    time for build + tests + sanitizer (default 9m30s)
  --core-only        build, tests, sanitizer; no benchmarks
  --bench-only       benchmarks only (build reused when up to date)
  --rebuild          rebuild the extension even when kernels/_C*.so looks up to date
  --archive FILE     also pack the results folder into FILE (.tgz), e.g. one file to bring back
  --dry-run          check this script's logic without a GPU (argument and budget parsing, folder
                     naming, collect_results.py and report.py on synthetic inputs, bash -n,
                     sanitize_cases.py --list); exits non-zero when a check fails
environment: PYTHON (interpreter to use), TORCH_CUDA_ARCH_LIST, CUDA_HOME, MAX_JOBS (override the
  detected values), RTDETR_PYTEST_ARGS (extra pytest args for the test step, e.g. "-n 4"),
  RTDETR_BUILD_TIMEOUT, RTDETR_TEST_TIMEOUT, RTDETR_SANITIZER_TIMEOUT (per-step caps, seconds),
  RTDETR_SANITIZER_TOOLS (default "memcheck racecheck"), COMPUTE_SANITIZER (its path)
EOF
}

die() { echo "gpu_suite: error: $*" >&2; exit 2; }
log() { echo "gpu_suite: $*"; }
now() { date +%s; }

# parse_duration 20m | 90s | 1h30m | 45  -> seconds on stdout; returns 1 when malformed
parse_duration() {
  local s=${1:-} total=0 rest num unit
  if [[ $s =~ ^[0-9]+$ ]]; then echo $((10#$s)); return 0; fi
  [[ $s =~ ^([0-9]+[hHmMsS])+$ ]] || return 1
  rest=$s
  while [[ $rest =~ ^([0-9]+)([hHmMsS])(.*)$ ]]; do
    num=$((10#${BASH_REMATCH[1]})); unit=${BASH_REMATCH[2]}; rest=${BASH_REMATCH[3]}
    case $unit in
      h|H) total=$((total + num * 3600)) ;;
      m|M) total=$((total + num * 60)) ;;
      s|S) total=$((total + num)) ;;
    esac
  done
  [[ -z $rest ]] || return 1
  echo "$total"
}

# ------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------
OUT=""
BUDGET_STR="20m"
CORE_BUDGET_STR="9m30s"
MODE="all"
DRY_RUN=0
REBUILD=0
ARCHIVE=""
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    --budget) need_value "$@"; BUDGET_STR=$2; shift 2 ;;
    --budget=*) BUDGET_STR=${1#*=}; shift ;;
    --core-budget) need_value "$@"; CORE_BUDGET_STR=$2; shift 2 ;;
    --core-budget=*) CORE_BUDGET_STR=${1#*=}; shift ;;
    --core-only) [[ $MODE == all || $MODE == core ]] || die "--core-only and --bench-only exclude each other"; MODE=core; shift ;;
    --bench-only) [[ $MODE == all || $MODE == bench ]] || die "--core-only and --bench-only exclude each other"; MODE=bench; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --rebuild) REBUILD=1; shift ;;
    --archive) need_value "$@"; ARCHIVE=$2; shift 2 ;;
    --archive=*) ARCHIVE=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
BUDGET_S=$(parse_duration "$BUDGET_STR") || die "--budget: expected a duration like 90s, 20m, 1h30m or seconds, got '$BUDGET_STR'"
CORE_BUDGET_S=$(parse_duration "$CORE_BUDGET_STR") || die "--core-budget: expected a duration like 9m30s, got '$CORE_BUDGET_STR'"

export PYTHONUNBUFFERED=1
T_START=$(now)
FAILED=0

# ------------------------------------------------------------------------------------------
# helpers shared by the real run and the dry run
# ------------------------------------------------------------------------------------------

# the interpreter: $PYTHON, else the first of .venv/bin/python, python3, python that imports torch
# (and, for a GPU run, sees a CUDA device)
pick_python() {
  # the dry run only needs torch to be there (importing it costs seconds)
  local check='import sys, importlib.util as u; sys.exit(0 if u.find_spec("torch") else 1)'
  [[ $DRY_RUN == 1 ]] || check='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
  local c candidates=("$REPO/.venv/bin/python" python3 python)
  [[ -n ${PYTHON:-} ]] && candidates=("$PYTHON")
  for c in "${candidates[@]}"; do
    if [[ -x $c ]] || command -v "$c" >/dev/null 2>&1; then
      if "$c" -c "$check" >/dev/null 2>&1; then echo "$c"; return 0; fi
    fi
  done
  return 1
}

# the CUDA toolkit root: $CUDA_HOME, else nvcc's TOP (nvcc may be a wrapper script), else /usr/local/cuda*
find_cuda_home() {
  if [[ -n ${CUDA_HOME:-} ]]; then echo "$CUDA_HOME"; return 0; fi
  local top="" d
  if command -v nvcc >/dev/null 2>&1; then
    top=$(nvcc -v /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1 || true)
    if [[ -n $top && -d $top ]]; then (cd "$top" && pwd -P); return 0; fi
    d=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    if [[ -x $d/bin/nvcc ]]; then echo "$d"; return 0; fi
  fi
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [[ -x $d/bin/nvcc ]]; then echo "$d"; return 0; fi
  done
  return 1
}

find_sanitizer() {
  if [[ -n ${COMPUTE_SANITIZER:-} && -x ${COMPUTE_SANITIZER} ]]; then echo "$COMPUTE_SANITIZER"; return 0; fi
  if command -v compute-sanitizer >/dev/null 2>&1; then command -v compute-sanitizer; return 0; fi
  local d
  for d in "${CUDA_HOME:-/nonexistent}/bin" "${CUDA_HOME:-/nonexistent}/compute-sanitizer" \
           /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer /usr/local/cuda*/bin /usr/local/cuda*/compute-sanitizer; do
    if [[ -x $d/compute-sanitizer ]]; then echo "$d/compute-sanitizer"; return 0; fi
  done
  return 1
}

# make `import rtdetr_kernels` load this checkout's kernels/ (a shim folder on PYTHONPATH when the
# package is not installed editable, e.g. after the build_ext --inplace fallback)
ensure_importable() {
  local where
  # find_spec resolves the package without importing torch
  where=$("$PY" -c 'import os, importlib.util as u; s = u.find_spec("rtdetr_kernels"); print(os.path.realpath(os.path.dirname(s.origin)) if s and s.origin else "")' 2>/dev/null || true)
  if [[ $where == "$(cd "$REPO/kernels" && pwd -P)" ]]; then return 0; fi
  SHIM_DIR=${SHIM_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/rtdetr-pyshim.XXXXXX")}
  ln -sfn "$REPO/kernels" "$SHIM_DIR/rtdetr_kernels"
  export PYTHONPATH="$SHIM_DIR${PYTHONPATH:+:$PYTHONPATH}"
  log "rtdetr_kernels is not installed from this checkout; importing it through $SHIM_DIR"
  "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("rtdetr_kernels") else 1)' >/dev/null 2>&1
}

# record_step NAME STATUS RC SECONDS LOG DETAIL  (one line of OUT/steps.tsv, read by collect_results.py)
record_step() {
  local detail=${6:-}
  detail=${detail//$'\t'/ }; detail=${detail//$'\n'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$detail" >>"$OUT/steps.tsv"
  case $2 in ok|skipped|reused|empty) ;; *) FAILED=1 ;; esac
  log "[$2] $1 (${4}s)${detail:+: $detail}"
}

# run_logged TIMEOUT LOG CMD...   runs CMD with a time limit, output to LOG; sets RC (124 = timed out)
run_logged() {
  local limit=$1 logf=$2; shift 2
  (( limit >= 1 )) || limit=1   # timeout 0 would mean no limit
  set +e
  # SIGINT first: pytest then stops like after Ctrl-C and still writes its junit/benchmark files
  timeout --signal="${RUN_SIGNAL:-INT}" --kill-after=20 "$limit" "$@" >>"$logf" 2>&1
  RC=$?
  set -e
  if [[ $RC == 137 ]]; then RC=124; fi   # killed after the grace period
}

status_of() { # RC -> ok / timeout / failed
  case $1 in 0) echo ok ;; 124) echo timeout ;; *) echo failed ;; esac
}

# seconds left until DEADLINE minus RESERVE, at most CAP
time_left() { # DEADLINE RESERVE CAP
  local left=$(( $1 - $(now) - $2 ))
  (( left > $3 )) && left=$3
  echo "$left"
}

# the benchmark items in order of importance: MSDA microbenchmarks, end to end, attention, top-K, the rest
bench_plan() {
  local f prio name
  {
    for f in bench/test_*.py; do
      [[ -e $f ]] || continue
      name=$(basename "$f" .py)
      case $name in
        *ms_deform*|*msda*) prio=0 ;;
        *attention*|*aifi*) prio=2 ;;
        *topk*|*top_k*) prio=3 ;;
        *) prio=4 ;;
      esac
      echo "$prio $f"
    done
    [[ -e bench/e2e.py ]] && echo "1 bench/e2e.py"
  } | sort -k1,1n -k2,2 | cut -d' ' -f2
}

# the time one item gets: an equal share of what is left, or all of it less 60 s for each later item
item_budget() { # REMAINING ITEMS_LEFT_AFTER_THIS
  local remaining=$1 later=$2 share greedy
  share=$(( remaining / (later + 1) ))
  greedy=$(( remaining - 60 * later ))
  (( greedy > share )) && share=$greedy
  echo "$share"
}

# ------------------------------------------------------------------------------------------
# dry run: the script's own logic, no GPU step
# ------------------------------------------------------------------------------------------
dry_run() {
  local checks=0 fails=0
  check() { # NAME CMD...
    checks=$((checks + 1))
    local out
    if out=$("${@:2}" 2>&1); then
      echo "  ok    $1"
    else
      fails=$((fails + 1))
      echo "  FAIL  $1"
      [[ -n $out ]] && printf '%s\n' "$out" | tail -n 20 | sed 's/^/        /'
    fi
  }
  log "dry run: checking the suite's own logic (no GPU step runs)"

  check "bash -n $SELF" bash -n "$SELF"

  check_durations() {
    local pair got
    for pair in "20m=1200" "90s=90" "45=45" "1h30m=5400" "1h=3600" "2m30s=150" "0=0" "10M=600"; do
      got=$(parse_duration "${pair%%=*}") || { echo "parse_duration ${pair%%=*} failed"; return 1; }
      [[ $got == "${pair#*=}" ]] || { echo "parse_duration ${pair%%=*} = $got, expected ${pair#*=}"; return 1; }
    done
    for bad in "" "abc" "20x" "m20" "1.5m" "-5" "20m "; do
      if parse_duration "$bad" >/dev/null; then echo "parse_duration accepted '$bad'"; return 1; fi
    done
    [[ $BUDGET_S =~ ^[0-9]+$ && $CORE_BUDGET_S =~ ^[0-9]+$ ]] || { echo "budgets not parsed"; return 1; }
    echo "budget $BUDGET_STR = ${BUDGET_S}s, core budget $CORE_BUDGET_STR = ${CORE_BUDGET_S}s"
  }
  check "duration parsing (--budget $BUDGET_STR = ${BUDGET_S}s)" check_durations

  check_args() { # the argument parser rejects what it should
    local args
    for args in "--core-only --bench-only" "--budget" "--budget 5parsecs" "--frobnicate" "--out"; do
      # shellcheck disable=SC2086
      if bash "$SELF" $args >/dev/null 2>&1; then echo "accepted: $args"; return 1; fi
    done
    bash "$SELF" --help | grep -q -- "--bench-only" || { echo "--help lacks --bench-only"; return 1; }
  }
  check "argument parsing rejects bad arguments" check_args

  check "'timeout' (coreutils) is available" command -v timeout

  PY=$(pick_python) || { echo "  FAIL  no python with torch${PYTHON:+ at PYTHON=$PYTHON} (set PYTHON=...)"; exit 1; }
  log "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"

  # output folder: the default name is <UTC date>-<gpu slug>; without --out it goes to a temp folder
  local tmp_root slug
  tmp_root=$(mktemp -d "${TMPDIR:-/tmp}/rtdetr-gpu-suite-dry.XXXXXX")
  slug=$("$PY" bench/collect_results.py env --dry-run --json "$tmp_root/env.json" | tail -n 1) \
    || { echo "  FAIL  collect_results.py env (the device and version probe)"; exit 1; }
  if [[ -z $OUT ]]; then OUT="$tmp_root/$(date -u +%F)-$slug"; fi
  mkdir -p "$OUT/logs" "$OUT/bench" "$OUT/sanitizer"
  mv "$tmp_root/env.json" "$OUT/env.json"
  check_outdir() {
    [[ -d $OUT/logs && -d $OUT/bench && -d $OUT/sanitizer && -w $OUT ]] || { echo "folders missing"; return 1; }
    [[ $slug =~ ^[a-z0-9-]+$ ]] || { echo "bad slug '$slug'"; return 1; }
    [[ $(date -u +%F)-$slug =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}-[a-z0-9-]+$ ]] || { echo "bad default folder name"; return 1; }
  }
  check "output folder $OUT (slug '$slug')" check_outdir
  : >"$OUT/steps.tsv"

  # synthetic inputs, as the GPU steps would leave them
  cat >"$OUT/junit.xml" <<'EOF'
<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="0" failures="0" skipped="2" tests="5" time="3.5"><testcase classname="tests.test_msda" name="test_forward[cuda-cuda-float32]" time="0.5" /><testcase classname="tests.test_msda" name="test_forward[cuda-triton-float32]" time="1.0" /><testcase classname="tests.test_msda" name="test_backward[cuda-cuda-bfloat16]" time="1.5" /><testcase classname="tests.test_msda" name="test_forward[cpu-triton-bfloat16]" time="0.0"><skipped type="pytest.skip" message="bf16 is not supported by the Triton interpreter">skip</skipped></testcase><testcase classname="tests.test_build" name="test_cuda_registered" time="0.0"><skipped type="pytest.skip" message="no GPU">skip</skipped></testcase></testsuite></testsuites>
EOF
  cat >"$OUT/bench/test_ms_deform_attn.json" <<'EOF'
{"machine_info": {"node": "synthetic"}, "commit_info": {"id": "synthetic"}, "datetime": "2026-01-01T00:00:00", "version": "5.1.0",
 "benchmarks": [
  {"group": "msda-fwd-bs8", "name": "test_msda_fwd[reference]", "fullname": "bench/test_ms_deform_attn.py::test_msda_fwd[reference]", "params": {"backend": "reference"}, "extra_info": {}, "stats": {"min": 0.0019, "max": 0.0022, "mean": 0.002, "stddev": 0.0001, "rounds": 50, "median": 0.002, "iqr": 0.0001, "ops": 500.0}},
  {"group": "msda-fwd-bs8", "name": "test_msda_fwd[cuda]", "fullname": "bench/test_ms_deform_attn.py::test_msda_fwd[cuda]", "params": {"backend": "cuda"}, "extra_info": {"speedup_vs_grid_sample": 3.9}, "stats": {"min": 0.00049, "max": 0.00055, "mean": 0.0005, "stddev": 0.00001, "rounds": 200, "median": 0.0005, "iqr": 0.00001, "ops": 2000.0}}
 ]}
EOF
  printf '%s\n' '{"rows": [{"model": "rtdetr_r50", "mode": "inference-bs1", "reference_ms": 9.5, "patched_ms": 7.1, "speedup": 1.34}]}' >"$OUT/e2e.json"
  printf '%s\n' "========= COMPUTE-SANITIZER" "[ok     ] ms_deform_attn/cuda-fp32-D32" "========= ERROR SUMMARY: 0 errors" >"$OUT/sanitizer/memcheck.log"
  printf '%s\n' "========= COMPUTE-SANITIZER" "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)" >"$OUT/sanitizer/racecheck.log"
  printf '%s\n' '{"summary": {"ok": 2, "error": 0, "skipped": 0, "unusable": 0}, "cases": [], "uncovered_ops": []}' >"$OUT/sanitizer/memcheck.cases.json"
  record_step build reused 0 0 "" "synthetic (dry run)"
  record_step tests ok 0 3 logs/tests.log "synthetic (dry run)"
  record_step sanitizer-memcheck ok 0 1 sanitizer/memcheck.log "synthetic (dry run)"
  record_step sanitizer-racecheck ok 0 1 sanitizer/racecheck.log "synthetic (dry run)"
  record_step bench-test_ms_deform_attn ok 0 2 logs/bench-test_ms_deform_attn.log "synthetic (dry run)"

  check "collect_results.py collect on synthetic inputs" "$PY" bench/collect_results.py collect --dir "$OUT"
  check "results.json and summary.md content" "$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
r = json.load(open(os.path.join(out, "results.json")))
assert r["schema"] == 1 and r["dry_run"] is True, r.get("schema")
for key in ("device", "versions", "git", "date", "steps", "tests", "sanitizer", "benchmarks", "e2e", "ok"):
    assert key in r, f"results.json lacks {key}"
for key in ("torch", "triton", "python", "driver", "cuda_toolkit"):
    assert key in r["versions"], f"versions lacks {key}"
s = r["tests"]["summary"]
assert (s["passed"], s["failed"], s["errors"], s["skipped"], s["total"]) == (3, 0, 0, 2, 5), s
assert len(r["tests"]["cases"]) == 5
assert {c["tool"]: (c["status"], c["errors"]) for c in r["sanitizer"]} == {"memcheck": ("ok", 0), "racecheck": ("ok", 0)}, r["sanitizer"]
items = {i["name"]: i for i in r["benchmarks"]["items"]}
assert abs(items["test_msda_fwd[cuda]"]["ratios"]["speedup_vs_baseline"] - 4.0) < 1e-9, items
assert items["test_msda_fwd[cuda]"]["ratios"]["speedup_vs_grid_sample"] == 3.9
assert items["test_msda_fwd[reference]"]["median_s"] == 0.002
assert r["e2e"]["rows"][0]["speedup"] == 1.34
assert r["ok"] is True, r["problems"]
assert [st["name"] for st in r["steps"]][:2] == ["build", "tests"]
merged = json.load(open(os.path.join(out, "bench.json")))
assert len(merged["benchmarks"]) == 2
md = open(os.path.join(out, "summary.md")).read()
for needle in ("| step | status |", "passed 3, failed 0, errors 0, skipped 2", "| memcheck | ok | 0 |", "4.00x", "(dry run)"):
    assert needle in md, f"summary.md lacks {needle!r}"
print("results.json and summary.md are complete")
EOF

  check_failure_paths() { # failures are reported as failures
    local neg
    neg=$(mktemp -d "${TMPDIR:-/tmp}/rtdetr-gpu-suite-neg.XXXXXX")
    printf '%s\n' "========= Invalid __global__ read of size 4 bytes" "========= ERROR SUMMARY: 3 errors" >"$neg/bad.log"
    if "$PY" bench/collect_results.py sanitizer-summary "$neg/bad.log" >"$neg/out" 2>&1; then
      echo "a log with 3 errors was not reported as a failure"; return 1
    fi
    grep -q '"errors": 3' "$neg/out" || { cat "$neg/out"; return 1; }
    printf '%s\n' "========= ERROR SUMMARY: 0 errors" >"$neg/good.log"
    if "$PY" bench/collect_results.py sanitizer-summary "$neg/good.log" --rc 1 >/dev/null 2>&1; then
      echo "a non-zero exit was not reported as a failure"; return 1
    fi
    printf '%s\n' "Traceback: CUDA error: an illegal memory access" >"$neg/crash.log"
    if "$PY" bench/collect_results.py sanitizer-summary "$neg/crash.log" --rc 1 >/dev/null 2>&1; then
      echo "a log without a summary was not reported as a failure"; return 1
    fi
    sed 's#<testcase classname="tests.test_build" name="test_cuda_registered" time="0.0"><skipped type="pytest.skip" message="no GPU">skip</skipped></testcase>#<testcase classname="tests.test_build" name="test_cuda_registered" time="0.0"><failure message="boom">boom</failure></testcase>#' \
      "$OUT/junit.xml" >"$neg/junit.xml"
    if "$PY" bench/collect_results.py junit-summary "$neg/junit.xml" >"$neg/out" 2>&1; then
      echo "a junit file with a failure was not reported as a failure"; return 1
    fi
    grep -q "failed 1" "$neg/out" || { cat "$neg/out"; return 1; }
    rm -rf "$neg"
  }
  check "sanitizer errors, crashes and test failures are reported as failures" check_failure_paths

  check_report() {
    local rep
    rep=$(mktemp -d "${TMPDIR:-/tmp}/rtdetr-gpu-suite-report.XXXXXX")
    printf '%s\n' "# demo" "<!-- bench-table:start -->" "old table" "<!-- bench-table:end -->" "tail" >"$rep/README.md"
    "$PY" bench/report.py --results "$OUT" --update-readme "$rep/README.md" --png "$rep/png" || return 1
    grep -q "test_msda_fwd\[cuda\]" "$rep/README.md" || { echo "table not written"; return 1; }
    grep -q "old table" "$rep/README.md" && { echo "old table kept"; return 1; }
    grep -q "^tail$" "$rep/README.md" || { echo "text after the markers lost"; return 1; }
    rm -rf "$rep"
  }
  check "report.py renders the table into README markers" check_report

  ensure_importable >/dev/null 2>&1 || true
  check_cases() {
    local listing n
    listing=$("$PY" bench/sanitize_cases.py --list 2>&1) || { printf '%s\n' "$listing"; return 1; }
    n=$(printf '%s\n' "$listing" | grep -c '^ms_deform_attn/cuda-' || true)
    (( n > 0 )) || { echo "no ms_deform_attn cuda cases listed"; printf '%s\n' "$listing" | tail -n 5; return 1; }
    printf '%s\n' "$listing" | grep '^#' | sed 's/^# //'
  }
  check "sanitize_cases.py --list enumerates cases" check_cases

  # what a GPU run would do (informational)
  local plan item later remaining
  log "plan for a GPU run (mode $MODE, budget ${BUDGET_S}s, core budget ${CORE_BUDGET_S}s):"
  echo "  core: build (pip install --no-build-isolation --no-deps --no-index -e . | setup.py build_ext --inplace),"
  echo "        pytest tests -q -rs --junitxml, compute-sanitizer ${RTDETR_SANITIZER_TOOLS:-memcheck racecheck}"
  echo "  CUDA_HOME would be: $(find_cuda_home 2>/dev/null || echo 'not found')"
  echo "  compute-sanitizer: $(find_sanitizer 2>/dev/null || echo 'not found here')"
  mapfile -t plan < <(bench_plan)
  remaining=$BUDGET_S
  later=${#plan[@]}
  for item in "${plan[@]}"; do
    later=$((later - 1))
    echo "  bench: $item (up to $(item_budget "$remaining" "$later")s of ${remaining}s left)"
  done
  [[ ${#plan[@]} -gt 0 ]] || echo "  bench: nothing yet (no bench/test_*.py, no bench/e2e.py)"

  echo
  if (( fails > 0 )); then
    log "dry run: $fails of $checks checks FAILED (results in $OUT)"
    exit 1
  fi
  log "dry run: all $checks checks passed (results in $OUT)"
  exit 0
}

if [[ $DRY_RUN == 1 ]]; then
  dry_run
fi

# ------------------------------------------------------------------------------------------
# the real run
# ------------------------------------------------------------------------------------------
unset TRITON_INTERPRET   # the tests must see the GPU, not the interpreter
command -v timeout >/dev/null 2>&1 || die "'timeout' (coreutils) is required"
PY=$(pick_python) || die "no python with a CUDA-enabled torch that sees a GPU (set PYTHON=...; use --dry-run without a GPU)"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L || true

TMP_ENV=$(mktemp "${TMPDIR:-/tmp}/rtdetr-env.XXXXXX")
SLUG=$("$PY" bench/collect_results.py env --json "$TMP_ENV" | tail -n 1) || die "collect_results.py env failed"
if [[ -z $OUT ]]; then OUT="$REPO/bench/results/$(date -u +%F)-$SLUG"; fi
mkdir -p "$OUT/logs" "$OUT/bench" "$OUT/sanitizer"
OUT=$(cd "$OUT" && pwd)
mv "$TMP_ENV" "$OUT/env.json"
log "python $PY, results in $OUT, mode $MODE"

# ---- 1. build ----------------------------------------------------------------------------
step_build() {
  local t0 cap so suffix method="" rc=0 logf="$OUT/logs/build.log" limit
  t0=$(now)
  : >"$logf"
  cap=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
  if CUDA_HOME=$(find_cuda_home); then
    export CUDA_HOME
    export FORCE_CUDA=${FORCE_CUDA:-1}   # a toolkit is there: a build without CUDA kernels is an error
    if [[ -x $CUDA_HOME/bin/nvcc ]] && ! command -v nvcc >/dev/null 2>&1; then export PATH="$CUDA_HOME/bin:$PATH"; fi
  else
    unset CUDA_HOME
    log "no CUDA toolkit found: the extension will build without CUDA kernels"
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  log "build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-none} MAX_JOBS=$MAX_JOBS (log $logf)"
  suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  so="$REPO/kernels/_C$suffix"
  limit=$(time_left "$CORE_DEADLINE" 240 "${RTDETR_BUILD_TIMEOUT:-420}")

  if [[ $REBUILD == 0 && -f $so && -z $(find csrc setup.py -type f -newer "$so" 2>/dev/null | head -n 1) ]] \
     && ensure_importable && "$PY" -c 'import sys; from rtdetr_kernels import backends as b; sys.exit(0 if b.extension_has_cuda() else 1)' >/dev/null 2>&1; then
    method=reused
  elif [[ -d build && -n $(find build -maxdepth 1 -name 'temp.*' -print -quit 2>/dev/null) ]]; then
    # pip's editable build compiles in a throwaway folder; only build_ext reuses carried objects
    log "build: reusing the objects under build/ (setup.py build_ext --inplace)"
    run_logged "$limit" "$logf" "$PY" setup.py build_ext --inplace
    rc=$RC; method=build_ext-inplace
  else
    run_logged "$limit" "$logf" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
    rc=$RC; method=pip-editable
    if [[ $rc != 0 && $rc != 124 ]]; then
      log "build: pip install -e . failed (rc $rc); falling back to setup.py build_ext --inplace"
      limit=$(time_left "$CORE_DEADLINE" 200 "${RTDETR_BUILD_TIMEOUT:-420}")
      run_logged "$limit" "$logf" "$PY" setup.py build_ext --inplace
      rc=$RC; method=build_ext-inplace
    fi
  fi
  ensure_importable || true
  "$PY" - "$OUT/build.json" "$method" "$rc" <<'EOF' || true
import json, os, sys
path, method, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = {"method": method, "rc": rc, "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "cuda_home": os.environ.get("CUDA_HOME"), "max_jobs": os.environ.get("MAX_JOBS")}
try:
    import rtdetr_kernels
    from rtdetr_kernels import backends
    info["extension_has_cuda"] = backends.extension_has_cuda()
    info["extension_error"] = backends.extension_error()
    info["package_path"] = os.path.dirname(rtdetr_kernels.__file__)
except Exception as exc:
    info["extension_has_cuda"] = False
    info["extension_error"] = f"import rtdetr_kernels failed: {type(exc).__name__}: {exc}"
json.dump(info, open(path, "w"), indent=1)
print(f"build: method {method}, extension_has_cuda={info['extension_has_cuda']}"
      + (f" ({info['extension_error']})" if info.get("extension_error") else ""))
EOF
  local has_cuda status detail
  has_cuda=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("extension_has_cuda"))' "$OUT/build.json" 2>/dev/null || echo False)
  status=$(status_of "$rc")
  detail="$method, arch $TORCH_CUDA_ARCH_LIST, CUDA kernels: $has_cuda"
  if [[ $status == ok && $has_cuda != True ]]; then status=failed; detail="$detail (the extension has no CUDA kernels)"; fi
  [[ $method == reused ]] && status=reused
  if [[ $status != ok && $status != reused ]]; then tail -n 30 "$logf" | sed 's/^/    /'; fi
  record_step build "$status" "$rc" $(( $(now) - t0 )) logs/build.log "$detail"
}

# ---- 2. tests ----------------------------------------------------------------------------
step_tests() {
  local t0 limit logf="$OUT/logs/tests.log" status detail
  t0=$(now)
  : >"$logf"
  limit=$(time_left "$CORE_DEADLINE" 150 "${RTDETR_TEST_TIMEOUT:-420}")
  if (( limit < 10 )); then record_step tests skipped 0 0 "" "core budget spent"; return; fi
  rm -f "$OUT/junit.xml"
  log "tests: pytest tests on CUDA (up to ${limit}s, log $logf)"
  # shellcheck disable=SC2086
  run_logged "$limit" "$logf" env -u TRITON_INTERPRET "$PY" -m pytest tests -q -rs -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" ${RTDETR_PYTEST_ARGS:-}
  status=$(status_of "$RC")
  [[ $RC == 5 ]] && status=failed   # no tests collected
  if [[ -f $OUT/junit.xml ]]; then
    detail=$("$PY" bench/collect_results.py junit-summary "$OUT/junit.xml" || true)
  else
    detail="no junit.xml (rc $RC)"
  fi
  if [[ $status != ok ]]; then
    grep -E '^(FAILED|ERROR) ' "$logf" | head -n 30 | sed 's/^/    /' || true
    tail -n 15 "$logf" | sed 's/^/    /'
  fi
  grep -E '^SKIPPED ' "$logf" | head -n 15 | sed 's/^/    /' || true
  record_step tests "$status" "$RC" $(( $(now) - t0 )) logs/tests.log "$detail"
}

# ---- 3. compute-sanitizer ----------------------------------------------------------------
step_sanitizer() {
  local san tool tools t0 limit logf status parsed errors left n i=0 args extra cases_line pstatus perrors pwarn
  tools=(${RTDETR_SANITIZER_TOOLS:-memcheck racecheck})
  if ! san=$(find_sanitizer); then
    for tool in "${tools[@]}"; do
      record_step "sanitizer-$tool" failed 127 0 "" "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
    done
    return
  fi
  n=${#tools[@]}
  for tool in "${tools[@]}"; do
    i=$((i + 1)); left=$((n - i))
    t0=$(now)
    logf="$OUT/sanitizer/$tool.log"
    : >"$logf"
    limit=$(time_left "$CORE_DEADLINE" $((left * 60 + 10)) "${RTDETR_SANITIZER_TIMEOUT:-300}")
    if (( limit < 10 )); then record_step "sanitizer-$tool" skipped 0 0 "" "core budget spent"; continue; fi
    args=(--tool "$tool" --error-exitcode 86 --print-limit 100)
    extra=()
    # racecheck only sees shared-memory hazards and is the slower tool: the smaller case set
    [[ $tool == racecheck ]] && extra+=(--quick)
    log "sanitizer: $tool (up to ${limit}s, log $logf)"
    # every tensor its own cudaMalloc, so that memcheck sees the true bounds of each buffer
    RUN_SIGNAL=TERM run_logged "$limit" "$logf" env -u TRITON_INTERPRET PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$san" "${args[@]}" "$PY" bench/sanitize_cases.py --require cuda \
      --json "$OUT/sanitizer/$tool.cases.json" "${extra[@]}"
    parsed=$("$PY" bench/collect_results.py sanitizer-summary "$logf" --rc "$RC" || true)
    status=$(status_of "$RC")
    errors=$(printf '%s' "$parsed" | "$PY" -c 'import json, sys; d = json.load(sys.stdin); print(d["status"], d["errors"], d["warnings"])' 2>/dev/null || echo "? ? ?")
    read -r pstatus perrors pwarn <<<"$errors"
    [[ $pstatus != ok && $status == ok ]] && status=failed
    if [[ $status != ok ]]; then
      grep -E '^(=========|\[error)' "$logf" | head -n 25 | sed 's/^/    /' || true
      echo "    ... last lines of $logf:"
      tail -n 8 "$logf" | sed 's/^/    /'
    fi
    cases_line=$(grep -E '^sanitize_cases: [0-9]+ ok' "$logf" | tail -n 1 | sed 's/^sanitize_cases: //' || true)
    [[ -n $cases_line ]] || cases_line="no case summary (rc $RC): $(grep -v '^=========' "$logf" | tail -n 1 | cut -c1-160)"
    record_step "sanitizer-$tool" "$status" "$RC" $(( $(now) - t0 )) "sanitizer/$tool.log" \
      "errors $perrors, warnings $pwarn; $cases_line"
  done
}

# ---- 4. benchmarks -----------------------------------------------------------------------
step_bench() {
  local plan item name t0 limit logf deadline remaining later status detail n
  mapfile -t plan < <(bench_plan)
  if [[ ${#plan[@]} == 0 ]]; then
    record_step bench skipped 0 0 "" "no bench/test_*.py or bench/e2e.py yet"
    return
  fi
  deadline=$(( $(now) + BUDGET_S ))
  later=${#plan[@]}
  for item in "${plan[@]}"; do
    later=$((later - 1))
    name=$(basename "$item" .py)
    remaining=$(( deadline - $(now) ))
    if (( remaining < 20 )); then record_step "bench-$name" skipped 0 0 "" "budget spent"; continue; fi
    limit=$(item_budget "$remaining" "$later")
    # the item's own budget: it should stop measuring in time to write its results
    export RTDETR_BENCH_BUDGET_S=$(( limit - (limit / 10 < 30 ? limit / 10 : 30) ))
    logf="$OUT/logs/bench-$name.log"
    : >"$logf"
    t0=$(now)
    log "bench: $item (budget ${RTDETR_BENCH_BUDGET_S}s, killed after ${limit}s, log $logf)"
    if [[ $item == bench/e2e.py ]]; then
      rm -f "$OUT/e2e.json"
      if "$PY" bench/e2e.py --help 2>/dev/null | grep -q -- '--json'; then
        run_logged "$limit" "$logf" env -u TRITON_INTERPRET "$PY" bench/e2e.py --json "$OUT/e2e.json"
      else
        run_logged "$limit" "$logf" env -u TRITON_INTERPRET RTDETR_BENCH_JSON="$OUT/e2e.json" "$PY" bench/e2e.py
      fi
      status=$(status_of "$RC")
      detail=$([[ -f $OUT/e2e.json ]] && echo "e2e.json written" || echo "no e2e.json")
    else
      rm -f "$OUT/bench/$name.json"
      run_logged "$limit" "$logf" env -u TRITON_INTERPRET "$PY" -m pytest "$item" -q -p no:cacheprovider \
        --benchmark-only --benchmark-json="$OUT/bench/$name.json"
      status=$(status_of "$RC")
      [[ $RC == 5 ]] && status=empty
      n=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["benchmarks"]))' "$OUT/bench/$name.json" 2>/dev/null || echo 0)
      detail="$n benchmarks"
    fi
    [[ $status == ok || $status == empty ]] || tail -n 15 "$logf" | sed 's/^/    /'
    record_step "bench-$name" "$status" "$RC" $(( $(now) - t0 )) "logs/bench-$name.log" "$detail"
  done
}

if [[ $MODE == all || $MODE == core ]]; then
  CORE_DEADLINE=$(( $(now) + CORE_BUDGET_S ))
  step_build
  step_tests
  step_sanitizer
  log "core done in $(( $(now) - T_START ))s"
fi
if [[ $MODE == all || $MODE == bench ]]; then
  if [[ $MODE == bench ]]; then
    CORE_DEADLINE=$(( $(now) + 600 ))
    step_build   # reused when kernels/_C*.so is up to date
  fi
  step_bench
fi

# ---- 5. record ---------------------------------------------------------------------------
"$PY" bench/collect_results.py collect --dir "$OUT" || { FAILED=1; log "collect_results.py failed"; }
[[ -f $OUT/summary.md ]] && cat "$OUT/summary.md"
if [[ -n $ARCHIVE ]]; then
  tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && log "packed $OUT into $ARCHIVE"
fi
log "finished in $(( $(now) - T_START ))s: $([[ $FAILED == 0 ]] && echo OK || echo 'FAILURES (see above and summary.md)')"
exit "$FAILED"
