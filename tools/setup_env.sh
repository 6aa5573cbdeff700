#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv/.
#
# Idempotent: when the stamp in .venv matches this script and setup.cfg,
# it only re-checks imports and returns in a second or two.
# On a machine with an NVIDIA driver, torch comes as PyPI's CUDA build;
# otherwise the CPU wheel is used.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${MILA_DET_TORCH_VERSION:-2.13.0}"

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

echo "[setup_env] preparing $VENV"
[[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$PY" -m pip install --disable-pip-version-check)
"${PIP[@]}" wheel numpy ninja packaging

if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup_env] NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
        PIP_FIND_LINKS="" "${PIP[@]}" "torch==$TORCH_VERSION"
    else
        echo "[setup_env] no GPU: installing the CPU build of torch $TORCH_VERSION"
        "${PIP[@]}" "torch==$TORCH_VERSION"
    fi
fi

# torch pulls a setuptools without pkg_resources, which mmcv's build and
# mmengine's config inheritance (mmdet::) both need at run time.
"${PIP[@]}" "setuptools>=77,<81"

if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
    echo "[setup_env] building mmcv 2.1.0 with its ops (about 15 minutes the first time; pip caches the wheel)"
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "${PIP[@]}" --no-build-isolation "mmcv==2.1.0"
fi

"${PIP[@]}" "mmengine==0.10.7" "mmdet==3.3.0" pycocotools triton pytest matplotlib
# ONNX export and its tests (setup.cfg's [deploy] extra; not needed to train).
"${PIP[@]}" "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.32.0"
"${PIP[@]}" --no-build-isolation --no-deps -e "$ROOT"

check_imports
stamp_value > "$STAMP"
echo "[setup_env] done: $("$PY" -c 'import torch, mmcv, mmdet; print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, cuda {torch.cuda.is_available()}")')"
