#!/usr/bin/env bash
# Build the extension here, on a CPU machine, for the GPU machine: against the GPU image's torch
# 2.11 (the venv of scripts/gpu_image_check.sh), CUDA kernels for sm_90a only
# (TORCH_CUDA_ARCH_LIST=9.0a, the value scripts/gpu_proof.sh uses everywhere), into .gpu-prebuilt/
# (ignored by git), which the device call carries. scripts/gpu_proof.sh then loads it when its
# manifest's torch version and source hash match, and builds only otherwise (its report says which).
#
#   scripts/gpu_prebuild.sh [--dry-run] [--out DIR]
#
# Slow on 2 cores (the CUDA half takes minutes); rerun after any change under csrc/ (the source
# hash changes, so an old build is refused on the GPU, never loaded by mistake). The device call:
#   run(command="bash scripts/gpu_proof.sh $OUT", carry=[".gpu-prebuilt"], timeout_s=480)
# Environment: VENV (default ~/.cache/fastconv/venv-gpu-image), MAX_JOBS.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$HOME/.cache/fastconv/venv-gpu-image}
PY=$VENV/bin/python
DEST=$REPO/.gpu-prebuilt
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) DEST=$2; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_prebuild.sh: error: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
export TORCH_CUDA_ARCH_LIST=9.0a FASTCONV_BUILD_CUDA=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# the build tree stays out of the user's cache: a separate cache dir for this build
export FASTCONV_CACHE_DIR=${FASTCONV_CACHE_DIR:-$REPO/.gpu-prebuilt-cache}

steps=(
    "[ -x '$PY' ] || bash '$REPO/scripts/gpu_image_check.sh' venv"
    "'$PY' -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'"
    "'$PY' -m fastconv build-ext --prebuilt '$DEST'"
    "FASTCONV_EXTENSION_LIB='$DEST' FASTCONV_NO_EXTENSION_BUILD=1 '$PY' -c 'from fastconv.backends import extension as e; ok, text = e.status(); print(text); raise SystemExit(0 if ok else 1)'"
    "du -sh '$DEST'; cat '$DEST/manifest.json'"
)
echo "gpu_prebuild.sh: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FASTCONV_BUILD_CUDA=1 FASTCONV_CACHE_DIR=$FASTCONV_CACHE_DIR"
for s in "${steps[@]}"; do
    echo "+ $s"
    [ "$DRY" = 1 ] || bash -c "$s"
done
if [ "$DRY" = 0 ]; then
    size=$(du -sm "$DEST" | cut -f1)
    [ "$size" -lt 48 ] || echo "gpu_prebuild.sh: warning: $DEST is ${size} MiB; the whole carried tree must stay under 64 MiB" >&2
fi
echo "device call: run(command=\"bash scripts/gpu_proof.sh \$OUT\", carry=[\".gpu-prebuilt\"], timeout_s=480)"
