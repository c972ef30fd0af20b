#!/usr/bin/env bash
# Everything fastconv checks and measures on a GPU machine, in one command:
#
#   scripts/gpu_all.sh OUTDIR [--quick | --full] [--budget SECONDS]
#
# For a machine as it comes (torch, triton, pytest, pytest-benchmark, ninja and matplotlib
# preinstalled, no network). Stages: editable install (else PYTHONPATH), extension build,
# `fastconv info`, the whole test suite on CUDA (junit XML), the per-layer and per-model
# pytest-benchmark suites, `fastconv bench` for AlexNet and VGG-11 (bf16 AMP, channels_last),
# then scripts/bench_report.py (markdown table and PNG charts). Every stage's output goes to
# OUTDIR/<stage>.log; a failing stage never stops the others; the summary comes last and the
# exit status is 0 only when every stage passed.
#
# Time: default ~8 min on an H100 (key layers; --budget 480), --quick ~4 min (AlexNet only,
# --budget 240), --full everything (every layer and model, torch.compile everywhere, fp32 and
# bf16; no budget). Stages that would start after the budget is spent are skipped and say so;
# the pytest-benchmark stages stop starting new cases in time to write their JSON.
#
# Adding a stage is one line in the plan below:   stage NAME LIMIT_SECONDS command args...
# Where one call is limited to 10 minutes, run it in parts on a warm machine, e.g.
#   ONLY_STAGES="install build-ext info tests" scripts/gpu_all.sh OUT
#   ONLY_STAGES="install peaks diag-errors sweep conv-tune" scripts/gpu_all.sh OUT2
# Environment: PYTHON (interpreter), SKIP_STAGES / ONLY_STAGES (space-separated stage names),
# TORCH_CUDA_ARCH_LIST (default: this GPU's architecture only, for a faster build), MAX_JOBS.
set -uo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
MODE=default
BUDGET=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        --budget) BUDGET=$2; shift ;;
        -h|--help) usage ;;
        *) echo "gpu_all.sh: unknown option $1" >&2; usage ;;
    esac
    shift
done
case "$MODE" in
    quick) BUDGET=${BUDGET:-240} ;;
    default) BUDGET=${BUDGET:-480} ;;
    full) BUDGET=${BUDGET:-0} ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
    [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST=$arch
fi

START=$(date +%s)
NAMES=(); RCS=(); SECS=(); NOTES=()

remaining() {  # seconds left in the budget (a large number when there is none)
    if [ "$BUDGET" -le 0 ]; then echo 999999; else echo $(( BUDGET - ($(date +%s) - START) )); fi
}

wanted() {
    local name=$1
    [[ " ${SKIP_STAGES:-} " == *" $name "* ]] && return 1
    [ -n "${ONLY_STAGES:-}" ] && [[ " $ONLY_STAGES " != *" $name "* ]] && return 1
    return 0
}

# stage NAME LIMIT CMD...: run CMD with its output in $OUT/NAME.log, killed after LIMIT seconds
# (or what is left of the budget, keeping RESERVE seconds for the stages that must come last)
stage() {
    local name=$1 limit=$2; shift 2
    wanted "$name" || return 0
    local left=$(( $(remaining) - ${RESERVE:-0} ))
    if [ "$left" -lt 15 ]; then
        NAMES+=("$name"); RCS+=("-"); SECS+=(0); NOTES+=("skipped: time budget spent")
        echo "=== [$name] skipped: time budget spent" >&2
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [$name] $* (limit ${limit}s)" >&2
    local t0=$(date +%s)
    { echo "\$ $*"; echo; } > "$OUT/$name.log"
    timeout --kill-after=15 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$? dt=$(( $(date +%s) - t0 )) note=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="killed at the ${limit}s limit"
    NAMES+=("$name"); RCS+=("$rc"); SECS+=("$dt"); NOTES+=("$note")
    tail -n 4 "$OUT/$name.log" | sed "s/^/    [$name] /" >&2
}

# seconds a benchmark suite may spend starting cases: its share, within what is left
bench_budget() {
    local want=$1 left=$(( $(remaining) - ${RESERVE:-0} - 30 ))
    [ "$BUDGET" -le 0 ] && { echo 0; return; }
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 10 ] && want=10
    echo "$want"
}

BENCH=(-m pytest -p no:cacheprovider -q -ra --benchmark-columns=median,iqr,rounds,iterations)
BF16=(--dtype bfloat16 --channels-last)

# ------------------------------------------------------------------------------ the plan
RESERVE=25  # for the report
stage install 120 "$PY" -m pip install --no-deps --no-build-isolation --disable-pip-version-check -e .
stage build-ext 420 "$PY" -m fastconv build-ext
stage info 60 "$PY" -m fastconv info
case "$MODE" in
    quick) TESTS=(-m "not slow") ;;
    *) TESTS=() ;;
esac
# xdist (on the GPU image) spreads Triton's compiles over the cores; -v keeps a per-test record
# in the log even if the stage is killed at its limit
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 16)
stage tests 300 "$PY" -m pytest tests -v -rfE -p no:cacheprovider --junitxml="$OUT/junit.xml" \
    "${XDIST[@]}" "${TESTS[@]}"

if [ "$MODE" = quick ]; then
    stage bench-alexnet 120 "$PY" -m fastconv bench --model alexnet "${BF16[@]}" --no-compile --json "$OUT/bench-alexnet.json" --results "$OUT/results.jsonl"
    stage layers 120 "$PY" "${BENCH[@]}" benchmarks/test_layers.py --fc-models alexnet --fc-rounds 5 \
        --fc-budget "$(bench_budget 60)" --benchmark-json="$OUT/layers.json" --fc-results "$OUT/results.jsonl"
    stage models 90 "$PY" "${BENCH[@]}" benchmarks/test_models.py --fc-models alexnet --fc-compile off \
        --fc-budget "$(bench_budget 30)" --benchmark-json="$OUT/models.json" --fc-results "$OUT/results.jsonl"
elif [ "$MODE" = default ]; then
    stage bench-alexnet 150 "$PY" -m fastconv bench --model alexnet "${BF16[@]}" --json "$OUT/bench-alexnet.json" --results "$OUT/results.jsonl"
    stage layers 180 "$PY" "${BENCH[@]}" benchmarks/test_layers.py --fc-budget "$(bench_budget 100)" \
        --benchmark-json="$OUT/layers.json" --fc-results "$OUT/results.jsonl"
    stage layers-bf16 120 "$PY" "${BENCH[@]}" benchmarks/test_layers.py --fc-models alexnet,vgg11 \
        --fc-dtype bfloat16 --fc-layout channels_last --fc-compile off \
        --fc-budget "$(bench_budget 45)" --benchmark-json="$OUT/layers-bf16.json" --fc-results "$OUT/results.jsonl"
    stage models 120 "$PY" "${BENCH[@]}" benchmarks/test_models.py --fc-models alexnet,vgg11,resnet18,googlenet \
        --fc-compile off --fc-budget "$(bench_budget 45)" --benchmark-json="$OUT/models.json" --fc-results "$OUT/results.jsonl"
    stage bench-vgg11 120 "$PY" -m fastconv bench --model vgg11 "${BF16[@]}" --no-compile --json "$OUT/bench-vgg11.json" --results "$OUT/results.jsonl"
else
    stage bench-alexnet 600 "$PY" -m fastconv bench --model alexnet "${BF16[@]}" --json "$OUT/bench-alexnet.json" --results "$OUT/results.jsonl"
    stage bench-vgg11 600 "$PY" -m fastconv bench --model vgg11 "${BF16[@]}" --json "$OUT/bench-vgg11.json" --results "$OUT/results.jsonl"
    stage layers 3600 "$PY" "${BENCH[@]}" benchmarks/test_layers.py --fc-layers all \
        --benchmark-json="$OUT/layers.json" --fc-results "$OUT/results.jsonl"
    stage layers-bf16 3600 "$PY" "${BENCH[@]}" benchmarks/test_layers.py --fc-layers all \
        --fc-dtype bfloat16 --fc-layout channels_last --benchmark-json="$OUT/layers-bf16.json" --fc-results "$OUT/results.jsonl"
    stage models 3600 "$PY" "${BENCH[@]}" benchmarks/test_models.py --benchmark-json="$OUT/models.json" --fc-results "$OUT/results.jsonl"
    stage models-bf16 3600 "$PY" "${BENCH[@]}" benchmarks/test_models.py --fc-dtype bfloat16 \
        --fc-layout channels_last --benchmark-json="$OUT/models-bf16.json" --fc-results "$OUT/results.jsonl"
fi
# the layer sweep on the shared timer (ceilings, backward breakdown), the error-path check,
# and the Triton conv tuning run (tables written under $OUT/tuned, to commit by hand)
stage peaks 60 "$PY" -m benchmarks.sweep --peaks-only --results "$OUT/results.jsonl"
stage diag-errors 90 bash scripts/gpu_diag_errors.sh "$OUT/diag"
stage sweep 240 "$PY" -m benchmarks.sweep --models alexnet,vgg16_bn,resnet18 --layers key \
    --dtype bfloat16 --layout channels_last --peaks --breakdown --results "$OUT/results.jsonl"
mkdir -p "$OUT/tuned"
stage conv-tune 300 "$PY" -m benchmarks.sweep --ops conv2d_relu --models alexnet,vgg11,googlenet \
    --layers key --providers eager,fc_triton --dtype bfloat16 --layout channels_last \
    --rounds 3 --tune "$OUT/tuned" --results "$OUT/results.jsonl"

RESERVE=0
shopt -s nullglob
results=("$OUT"/results.json[l])  # every stage appends its rows here (glob: none if absent)
if [ ${#results[@]} -gt 0 ]; then
    stage report 60 "$PY" scripts/bench_report.py "${results[@]}" --out "$OUT/report"
else
    NAMES+=(report); RCS+=("-"); SECS+=(0); NOTES+=("skipped: no result JSON was written")
fi

# ------------------------------------------------------------------------------ summary
failed=0
for rc in "${RCS[@]}"; do
    [ "$rc" = "0" ] || [ "$rc" = "-" ] || failed=1
done
{
    echo "fastconv gpu_all ($MODE) on $(hostname) in $(( $(date +%s) - START ))s;" \
         "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'); logs in $OUT"
    printf '%-14s %6s %6s  %s\n' stage status secs note
    for i in "${!NAMES[@]}"; do
        rc=${RCS[$i]}
        if [ "$rc" = "0" ]; then status=ok; elif [ "$rc" = "-" ]; then status=skip; else status="rc=$rc"; fi
        printf '%-14s %6s %6s  %s\n' "${NAMES[$i]}" "$status" "${SECS[$i]}" "${NOTES[$i]}"
    done
    [ -f "$OUT/report/report.md" ] && echo "report: $OUT/report/report.md (charts beside it)"
} | tee "$OUT/summary.txt"
exit $failed
