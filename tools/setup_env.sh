#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv/
# (MILA_DET_VENV=DIR puts it elsewhere).
#
# Idempotent: when the stamp in .venv matches this script and setup.cfg,
# it only re-checks imports and returns in a second or two.
# On a machine with an NVIDIA driver, torch comes as PyPI's CUDA build (or
# from MILA_DET_TORCH_INDEX, e.g. https://download.pytorch.org/whl/cu126),
# and mmcv's ops are compiled with CUDA for the local GPUs
# (TORCH_CUDA_ARCH_LIST overrides); otherwise the CPU wheel is used.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${MILA_DET_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${MILA_DET_TORCH_VERSION:-2.13.0}"
TORCH_INDEX="${MILA_DET_TORCH_INDEX:-}"

stamp_value() {
    cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.cfg" | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.mila_det_env"

check_imports() {
    "$PY" - <<'PYEOF'
import mmcv, mmdet, mmengine, torch, pycocotools  # noqa: F401
from mmcv.ops import RoIAlign, nms  # noqa: F401  (compiled ops present)
import mila_det  # noqa: F401
import onnx, onnxruntime, onnxscript  # noqa: F401  (tests/deploy)
PYEOF
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_value)" ]] && check_imports 2>/dev/null; then
    echo "[setup_env] .venv is up to date"
    exit 0
fi

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPU=1
fi

# On a GPU machine mmcv's ops are compiled by nvcc, which must come from a
# CUDA toolkit of the torch build's major version. tools/cuda_toolchain.py
# checks that (and the driver, and nvcc against the local GPUs) and prints
# the CUDA_HOME to build with, or stops the set-up with what was found, what
# is needed and how to get it. It runs first before anything is downloaded
# (the pinned torch's CUDA version is known in advance), and again once
# torch is installed (exact, and the only check for a torch version it
# does not know).
CUDA_HOME_FOR_MMCV=""
toolchain_check() {
    CUDA_HOME_FOR_MMCV="$("$PYTHON" "$ROOT/tools/cuda_toolchain.py" check \
        --torch-version "$TORCH_VERSION" --torch-index "$TORCH_INDEX" \
        --venv-python "$PY")" || exit 1
}

echo "[setup_env] preparing $VENV"
if [[ $GPU == 1 ]]; then
    toolchain_check
fi
[[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$PY" -m pip install --disable-pip-version-check)
"${PIP[@]}" wheel numpy ninja packaging

if ! "$PY" -c "import torch" 2>/dev/null; then
    if [[ $GPU == 1 ]]; then
        echo "[setup_env] NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION${TORCH_INDEX:+ from $TORCH_INDEX}"
        PIP_FIND_LINKS="" "${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$TORCH_VERSION"
        toolchain_check
    else
        echo "[setup_env] no GPU: installing the CPU build of torch $TORCH_VERSION"
        "${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$TORCH_VERSION"
    fi
fi

# torch pulls a setuptools without pkg_resources, which mmcv's build and
# mmengine's config inheritance (mmdet::) both need at run time.
"${PIP[@]}" "setuptools>=77,<81"

MMCV_READY="import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'"
if [[ $GPU == 0 ]]; then
    if ! "$PY" -c "$MMCV_READY" 2>/dev/null; then
        echo "[setup_env] building mmcv 2.1.0 with its ops (about 15 minutes the first time; pip caches the wheel)"
        MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            "${PIP[@]}" --no-build-isolation "mmcv==2.1.0"
    fi
elif ! "$PY" -c "$MMCV_READY; assert mmcv.ops.get_compiling_cuda_version() != 'not available'" 2>/dev/null; then
    REBUILD=()
    if "$PY" -c "import mmcv" 2>/dev/null; then
        # an mmcv without CUDA ops (pip's cached wheel may be that one too)
        "$PY" -m pip uninstall --yes mmcv
        REBUILD=(--no-cache-dir)
    fi
    ARCHS="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" "$ROOT/tools/cuda_toolchain.py" arch-list)}"
    # mmcv 2.1.0's CUDA sources include <THC/THCAtomics.cuh>, which recent
    # torch no longer ships (2.13 has no THC/ headers; the atomics live in
    # ATen/cuda/Atomic.cuh). A one-line stand-in on CPATH, which the
    # compilers search after torch's own include folders.
    COMPAT="$(mktemp -d)"
    mkdir -p "$COMPAT/THC"
    printf '#pragma once\n#include <ATen/cuda/Atomic.cuh>\n' > "$COMPAT/THC/THCAtomics.cuh"
    echo "[setup_env] building mmcv 2.1.0 with CUDA ops for TORCH_CUDA_ARCH_LIST='$ARCHS' with ${CUDA_HOME_FOR_MMCV:-${CUDA_HOME:-?}}/bin/nvcc (roughly 5 minutes on 16 cores, 25 on 2, the first time: see README 'On a GPU machine'; pip caches the wheel)"
    CUDA_HOME="${CUDA_HOME_FOR_MMCV:-${CUDA_HOME:-}}" TORCH_CUDA_ARCH_LIST="$ARCHS" \
        CPATH="$COMPAT${CPATH:+:$CPATH}" \
        FORCE_CUDA=1 MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "${PIP[@]}" --no-build-isolation ${REBUILD[@]+"${REBUILD[@]}"} "mmcv==2.1.0"
    rm -rf "$COMPAT"
fi

"${PIP[@]}" "mmengine==0.10.7" "mmdet==3.3.0" pycocotools triton pytest matplotlib
# ONNX export and its tests (setup.cfg's [deploy] extra; not needed to train).
"${PIP[@]}" "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0"
"${PIP[@]}" --no-build-isolation --no-deps -e "$ROOT"

check_imports
stamp_value > "$STAMP"
echo "[setup_env] done: $("$PY" -c 'import torch, mmcv, mmdet; print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, cuda {torch.cuda.is_available()}")')"
if [[ $GPU == 1 ]]; then
    echo "[setup_env] to prove the detector trains on this GPU: make gpu-check"
fi
