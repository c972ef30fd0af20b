#!/usr/bin/env bash
# The GPU machine's software, checked on a CPU machine: what a GPU session would otherwise find
# out in its first (scarce) device call.
#
#   scripts/gpu_image_check.sh [STEP ...]        steps: venv ext aot tests (default: all)
#
# The lent GPU machine runs torch 2.11 and Triton 3.6 with no hypothesis and no network; CI runs
# torch 2.14 and Triton 3.8. This builds a virtual environment with the GPU image's versions
# (torch==2.11.0 from PyPI, ~5 GB with its nvidia wheels; numpy < 2.4, whose 2.4 breaks Triton
# 3.6's interpreter; no hypothesis), then:
#   ext    builds the C++ extension against torch 2.11 (CPU kernels and, where nvcc is found,
#          the CUDA kernels, FASTCONV_BUILD_CUDA=1: a compile check of csrc/ against the GPU
#          image's headers);
#   aot    compiles every Triton configuration for sm_90 with Triton 3.6's compiler and ptxas
#          (benchmarks/aot_sm90_triton36.md; found there once: ptxas serialising wgmma);
#   tests  runs the test suite (Triton in the interpreter, the extension's CPU kernels).
# VENV picks the environment's directory (default ~/.cache/fastconv/venv-gpu-image).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$HOME/.cache/fastconv/venv-gpu-image}
PY=$VENV/bin/python
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(venv ext aot tests)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

for step in "${STEPS[@]}"; do
    echo "=== gpu_image_check: $step"
    case "$step" in
        venv)
            [ -x "$PY" ] || python3 -m venv "$VENV"
            "$PY" -m pip install --disable-pip-version-check -q "torch==2.11.0" "numpy<2.4" \
                pytest pytest-benchmark ninja
            "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
            ;;
        ext)
            FASTCONV_BUILD_CUDA=1 "$PY" -m fastconv build-ext
            ;;
        aot)
            "$PY" scripts/aot_report.py --jobs "$(nproc)" --out benchmarks/aot_sm90_triton36.md
            ;;
        tests)
            FASTCONV_NO_EXTENSION_BUILD=1 "$PY" -m pytest tests -q -p no:cacheprovider -ra
            ;;
        *)
            sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
            exit 2
            ;;
    esac
done
