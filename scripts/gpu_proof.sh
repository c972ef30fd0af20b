#!/usr/bin/env bash
# The GPU proof in one device call: correctness, the numbers that decide what to work on, and
# whatever else fits, inside a hard budget of command time.
#
#   scripts/gpu_proof.sh OUTDIR [--budget S] [--dry-run] [--cpu-smoke] [--work DIR]
#
#   --budget S    seconds of command time in all (default 420); stages whose deadline falls
#                 past the budget are skipped, time a stage leaves unused passes to the next
#   --dry-run     print the plan (each stage's limit and deadline, the total) and exit
#   --cpu-smoke   run every stage's entry point on the CPU (tiny shapes, TRITON_INTERPRET=1,
#                 pytest collects without running): proves the script has no typo, missing
#                 import or wrong path; CI runs it (tests/test_gpu_proof.py)
#   --work DIR    where logs and raw results go (default: a fresh folder under $TMPDIR)
#
# Stages, in order of information per second, each with its own deadline (stopped with SIGINT,
# so pytest writes its junit XML and summary, then SIGKILL a few seconds later):
#   preflight     versions, device, nvidia-smi, packages, tools, which extension path
#   ext           (background, overlapping the Triton tests) load the prebuilt extension when
#                 $FASTCONV_EXTENSION_LIB (default .gpu-prebuilt/ when present) matches, else build
#   peaks         copy bandwidth and bf16 matmul rate
#   tests-triton  pytest of the Triton tests, xdist, per-test timeout, junit
#   tests-cuda    pytest of the rest (extension, integration), after the extension is ready
#   integration   torch.compile(fullgraph=True) train steps, CUDA-graph capture of a step
#   errors        the extension's error paths (~10 s); only after a crash (the segfault seen on
#                 the H100) the diagnosis, which needs the rest of its 45 s
#   layers        per layer of AlexNet / VGG-11 (+ ResNet-18 BN): every backend vs torch eager
#   steps         AlexNet, VGG-11, ResNet-18 training steps: eager, converted, compiled
#   memcheck      (if time is left) compute-sanitizer over one small call per CUDA kernel
#   tune          (if time is left) autotuning sweep of the worst conv layers
# After every stage the pack step rewrites OUTDIR: REPORT.md, summary.json, preflight.json,
# correctness.json, numbers.json, stage3.json, tuned_configs.json (if tuned), logs.tar.gz --
# never more than 8 files, so a run stopped at any point has returned all it finished. Commit
# them under benchmarks/results/<device>-<date>/.
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0a: the prebuilt
# library's, the same in every stage), FASTCONV_EXTENSION_LIB, MAX_JOBS.
set -uo pipefail

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
OUT= BUDGET=420 DRY=0 SMOKE=0 WORK=
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET=${2:-}; shift ;;
        --budget=*) BUDGET=${1#*=} ;;
        --dry-run) DRY=1 ;;
        --cpu-smoke) SMOKE=1 ;;
        --work) WORK=${2:-}; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "gpu_proof.sh: error: unknown option $1" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "gpu_proof.sh: error: one OUTDIR only" >&2; exit 2; }; OUT=$1 ;;
    esac
    shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] && [ "$BUDGET" -ge 1 ] || {
    echo "gpu_proof.sh: error: --budget takes whole seconds >= 1, got '$BUDGET'" >&2; exit 2; }
[ -n "$OUT" ] || [ "$DRY" = 1 ] || { echo "gpu_proof.sh: error: OUTDIR is required" >&2; exit 2; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
HERE=$REPO/scripts/gpu_proof
PY=${PYTHON:-python3}
RESERVE=10            # the final pack
GRACE=8               # SIGINT this long before a stage's deadline, SIGKILL at it
MIN_STAGE=5           # a stage with less time than this is skipped
[ "$SMOKE" = 1 ] && { GRACE=3; MIN_STAGE=2; }

# ------------------------------------------------------------------------------ the plan
# name, planned seconds (deadlines are cumulative: what a stage leaves unused passes on),
# kind (fg: foreground; bg: background until the stage named after it; rest: until the budget)
PLAN=(
    "preflight 15 fg"
    "ext 0 bg"
    "peaks 15 fg"
    "tests-triton 80 fg"
    "tests-cuda 75 fg"
    "integration 35 fg"
    "errors 45 fg"
    "layers 75 fg"
    "steps 60 fg"
    "memcheck 0 rest"
    "tune 0 rest"
)
# deadline (seconds from the start) of each stage, capped by the budget less the pack reserve
declare -A END
plan_deadlines() {
    local t=0 cap=$(( BUDGET - RESERVE )) name secs kind
    for row in "${PLAN[@]}"; do
        read -r name secs kind <<< "$row"
        case "$kind" in
            fg) t=$(( t + secs )) ; END[$name]=$(( t < cap ? t : cap )) ;;
            bg) END[$name]=-1 ;;          # set below: the end of the Triton tests
            rest) END[$name]=$cap ;;
        esac
    done
    END[ext]=${END[tests-triton]}
}
plan_deadlines

# memcheck has its own stage; the AOT compile reports run in CI (ptxas, no GPU needed)
PYTEST_SEL_TRITON="triton and not aot and not memcheck and not sanitizer"
PYTEST_SEL_CUDA="not triton and not aot and not memcheck and not sanitizer"

if [ "$DRY" = 1 ]; then
    echo "gpu_proof.sh plan: budget ${BUDGET}s (pack reserve ${RESERVE}s;" \
         "SIGINT ${GRACE}s before each deadline, then SIGKILL)"
    printf '%-13s %6s %9s  %s\n' stage limit_s deadline what
    prev=0 total=0 rest_counted=0
    for row in "${PLAN[@]}"; do
        read -r name secs kind <<< "$row"
        end=${END[$name]}
        what=
        case "$kind" in
            bg) limit=$(( end - ${END[preflight]} ))
                what="background from preflight's end, overlapping peaks and tests-triton" ;;
            rest) limit=$(( end - prev )); [ "$limit" -lt 0 ] && limit=0
                  what="shared by the late stages (this plus what earlier stages leave)"
                  [ "$rest_counted" = 0 ] && total=$(( total + limit )); rest_counted=1 ;;
            *) limit=$(( end - prev )); [ "$limit" -lt 0 ] && limit=0; prev=$end
               total=$(( total + limit )) ;;
        esac
        [ "$kind" = fg ] && [ "$limit" -lt "$MIN_STAGE" ] && what="skipped: over the budget"
        printf '%-13s %6s %9s  %s\n' "$name" "$limit" "$end" "$what"
    done
    total=$(( total + RESERVE ))
    printf '%-13s %6s %9s\n' pack "$RESERVE" "$BUDGET"
    echo "total ${total}s <= budget ${BUDGET}s"
    echo "pytest -m 'not slow' -k: tests-triton '$PYTEST_SEL_TRITON';" \
         "tests-cuda '$PYTEST_SEL_CUDA'"
    exit 0
fi

# ------------------------------------------------------------------------------ environment
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_proof.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
case "$WORK/" in
    "$OUT"/*) echo "gpu_proof.sh: error: --work must lie outside OUTDIR" >&2; exit 2 ;;
esac
: > "$WORK/stages.tsv"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# only the ext stage builds (its explicit build() ignores this): no stage or test starts a lazy
# build of its own (the tune stage's separate cache dir would otherwise start one)
export FASTCONV_NO_EXTENSION_BUILD=1
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    SMOKE_ARG=(--cpu-smoke)
else
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
    unset TRITON_INTERPRET
    SMOKE_ARG=()
fi
if [ -z "${FASTCONV_EXTENSION_LIB:-}" ] && [ -f "$REPO/.gpu-prebuilt/manifest.json" ]; then
    export FASTCONV_EXTENSION_LIB=$REPO/.gpu-prebuilt
fi

START=$(date +%s)
now() { echo $(( $(date +%s) - START )); }
FAILED=0
CUR_PID=

pack() {
    "$PY" "$HERE/report.py" --work "$WORK" --out "$OUT" --budget "$BUDGET" --elapsed "$(now)" \
        > "$WORK/pack.log" 2>&1 || { echo "=== pack failed:" >&2; tail -3 "$WORK/pack.log" >&2; }
}

record() {  # record NAME RC SECONDS LIMIT NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/stages.tsv"
    case "$2" in 0|-) ;; *) FAILED=1 ;; esac
    echo "=== [$1] rc=$2 ${3}s (limit ${4}s) $5" >&2
}

on_signal() {
    echo "=== gpu_proof.sh: stopped by a signal at $(now)s: stopping the stage, packing" >&2
    [ -n "$CUR_PID" ] && kill -INT -- "-$CUR_PID" 2>/dev/null
    sleep 2
    [ -n "$CUR_PID" ] && kill -KILL -- "-$CUR_PID" 2>/dev/null
    [ -n "${EXT_PID:-}" ] && kill -KILL -- "-$EXT_PID" 2>/dev/null
    record "${CUR_NAME:-between-stages}" 130 0 0 "stopped by a signal"
    pack
    exit 130
}
trap on_signal TERM INT

# launch NAME LIMIT CMD...: CMD under timeout (which makes its own process group and signals
# all of it): SIGINT at LIMIT-GRACE, SIGKILL at LIMIT; sets LAUNCHED to timeout's pid
launch() {
    local name=$1 limit=$2; shift 2
    local int_at=$(( limit - GRACE )); [ "$int_at" -lt 1 ] && int_at=1
    # Python stages stop starting new cases a little before the SIGINT
    export GPU_PROOF_DEADLINE=$(( $(date +%s) + int_at - 2 ))
    { echo "\$ $*"; echo "(SIGINT after ${int_at}s, SIGKILL after ${limit}s)"; echo; } \
        > "$WORK/$name.log"
    timeout -s INT -k "$(( limit - int_at ))" "$int_at" "$@" >> "$WORK/$name.log" 2>&1 &
    LAUNCHED=$!
}

verdict() {  # verdict RC -> note
    case "$1" in
        0) echo "" ;;
        124) echo "stopped at its deadline (SIGINT)" ;;
        137) echo "killed at its deadline (SIGKILL)" ;;
        *) echo "$(grep -m1 -E 'Error|error:|FAILED|Traceback' "$WORK/$2.log" | cut -c1-160)" ;;
    esac
}

# stage NAME CMD...: runs CMD until the stage's deadline
stage() {
    local name=$1; shift
    local left=$(( ${END[$name]} - $(now) ))
    if [ "$left" -lt "$MIN_STAGE" ]; then
        record "$name" - 0 0 "skipped: time budget spent"
        return 0
    fi
    echo "=== [$name] $* (limit ${left}s)" >&2
    local t0; t0=$(now)
    CUR_NAME=$name
    launch "$name" "$left" "$@"
    CUR_PID=$LAUNCHED
    wait "$CUR_PID"; local rc=$?
    CUR_PID= CUR_NAME=
    record "$name" "$rc" "$(( $(now) - t0 ))" "$left" "$(verdict "$rc" "$name")"
    tail -n 3 "$WORK/$name.log" | cut -c1-200 | sed "s/^/    [$name] /" >&2
    pack
}

py_stage() {  # py_stage NAME MODULE [ARGS...]
    local name=$1 module=$2; shift 2
    stage "$name" "$PY" "$HERE/$module.py" --work "$WORK" "${SMOKE_ARG[@]}" "$@"
}

pytest_stage() {  # pytest_stage NAME SELECTION WORKERS PER_TEST_TIMEOUT
    local name=$1 sel=$2 workers=$3 per_test=$4
    local args=(-m pytest tests -p no:cacheprovider -q -rfE --durations=25 -o junit_family=xunit1
                -m "not slow" -k "$sel" --junitxml="$WORK/junit-$name.xml")
    [ "${HAVE_XDIST:-0}" = 1 ] && args+=(-n "$workers")
    [ "${HAVE_TIMEOUT:-0}" = 1 ] && args+=(--timeout "$per_test")
    [ "$SMOKE" = 1 ] && args+=(--co)
    # inductor under xdist: one compile thread per worker
    stage "$name" env TORCHINDUCTOR_COMPILE_THREADS=1 "$PY" "${args[@]}"
}

# ------------------------------------------------------------------------------ the run
echo "=== gpu_proof.sh: budget ${BUDGET}s, OUTDIR $OUT, logs $WORK" \
     "$([ "$SMOKE" = 1 ] && echo '(CPU smoke)')" >&2
py_stage preflight preflight
# shellcheck disable=SC1091
[ -f "$WORK/preflight.env" ] && . "$WORK/preflight.env"

ext_left=$(( ${END[ext]} - $(now) ))
EXT_PID= ext_t0=$(now)
if [ "$ext_left" -ge "$MIN_STAGE" ]; then
    launch ext "$ext_left" env FASTCONV_NO_EXTENSION_BUILD=0 \
        "$PY" "$HERE/build_ext.py" --work "$WORK" "${SMOKE_ARG[@]}"
    EXT_PID=$LAUNCHED
    echo "=== [ext] in the background (limit ${ext_left}s)" >&2
else
    record ext - 0 0 "skipped: time budget spent"
fi

py_stage peaks peaks
pytest_stage tests-triton "$PYTEST_SEL_TRITON" 8 60

if [ -n "$EXT_PID" ]; then
    wait "$EXT_PID"; rc=$?
    record ext "$rc" "$(( $(now) - ext_t0 ))" "$ext_left" "$(verdict "$rc" ext)"
    tail -n 2 "$WORK/ext.log" | cut -c1-200 | sed "s/^/    [ext] /" >&2
    EXT_PID=
    pack
fi

pytest_stage tests-cuda "$PYTEST_SEL_CUDA" 16 90
py_stage integration integration
py_stage errors errors
py_stage layers layer_times
py_stage steps train_steps
if [ "$SMOKE" = 1 ] || [ "${HAVE_SANITIZER:-0}" = 1 ]; then
    py_stage memcheck memcheck
else
    record memcheck - 0 0 "skipped: compute-sanitizer not found"
fi
FASTCONV_CACHE_DIR=$WORK/tune-cache py_stage tune tune

pack
echo "=== gpu_proof.sh: done in $(now)s of ${BUDGET}s; $OUT holds: $(ls "$OUT" | tr '\n' ' ')" >&2
# the device tool returns the output's tail: the report, then the stage table once more
cat "$OUT/REPORT.md"
echo
sed -n '/^## Stages/,/^## Stage 1/p' "$OUT/REPORT.md" | head -n -1
exit $FAILED
