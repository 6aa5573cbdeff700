#!/usr/bin/env bash
# Fill a folder with every wheel tools/gpu_check.py needs on an offline CUDA
# machine that already has torch and triton:
#
#   bash tools/gpu_wheels.sh WHEEL_DIR [PYTHON_VERSION]    # e.g. 3.12
#
# Run it here (or anywhere with pip access), copy WHEEL_DIR to the GPU
# machine, then there:  python tools/gpu_check.py OUT --wheels WHEEL_DIR
# (or by hand: pip install --no-index --find-links WHEEL_DIR mila_det
# "setuptools<81").
#
# The folder holds mila_det, mmengine, mmdet, mmcv built without its
# compiled ops (pure Python: the backbones need none of them, only the
# detectors' RoI ops do), and their dependencies as binary wheels for
# PYTHON_VERSION (default: this Python's) on manylinux x86_64, with
# setuptools<81 (mmengine needs pkg_resources at run time). Torch and
# triton are left out: they must match the machine's CUDA.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:?usage: bash tools/gpu_wheels.sh WHEEL_DIR [PYTHON_VERSION]}"
PY="${PYTHON:-python3}"
[[ -x "$ROOT/.venv/bin/python" ]] && PY="${PYTHON:-$ROOT/.venv/bin/python}"
TARGET="${2:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT

echo "[gpu_wheels] mila_det and mmcv 2.1.0 without ops -> $DIR"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DIR" "$ROOT"
# mmcv's setup.py names an ops-free build "mmcv-lite"; mmdet asks for
# "mmcv", so the wheel is built from the source archive and renamed. No
# cache: a cached mmcv wheel could be the one built with ops (or this one
# could later be taken for it).
"$PY" -m pip download --quiet --no-cache-dir --no-deps --no-binary :all: \
    -d "$BUILD" "mmcv==2.1.0"
MMCV_WITH_OPS=0 "$PY" -m pip wheel --quiet --no-cache-dir --no-deps \
    --no-build-isolation -w "$BUILD" "$BUILD"/mmcv-2.1.0.tar.gz
# The build tags it with this interpreter's ABI, but it holds no compiled
# code: retag it for any Python 3 so that other versions accept it.
for whl in "$BUILD"/mmcv_lite-2.1.0-*.whl; do
    "$PY" - "$whl" "$DIR" <<'PYEOF'
import os, re, shutil, sys, tempfile, zipfile
src, out = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(src).namelist()
assert not any(n.endswith(('.so', '.pyd')) for n in names), \
    'mmcv was built with compiled ops'
dst = os.path.join(out, 'mmcv-2.1.0-py3-none-any.whl')
old_info, new_info = 'mmcv_lite-2.1.0.dist-info/', 'mmcv-2.1.0.dist-info/'
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w',
                                                  zipfile.ZIP_DEFLATED) as z:
    for item in zin.infolist():
        data = zin.read(item.filename)
        name = item.filename.replace(old_info, new_info)
        if name.endswith('.dist-info/METADATA'):
            data = re.sub(r'^Name: .*$', 'Name: mmcv', data.decode(),
                          count=1, flags=re.M).encode()
        if name.endswith('.dist-info/WHEEL'):
            text = re.sub(r'^Tag: .*$', 'Tag: py3-none-any',
                          data.decode(), flags=re.M)
            text = re.sub(r'^Root-Is-Purelib: .*$', 'Root-Is-Purelib: true',
                          text, flags=re.M)
            data = text.encode()
        elif name.endswith('.dist-info/RECORD'):
            # edited files lose their hashes (pip does not check RECORD)
            data = b''.join(
                (line.split(b',')[0] + b',,' if any(
                    k in line for k in (b'/WHEEL,', b'/METADATA,'))
                 else line).replace(old_info.encode(), new_info.encode())
                + b'\n' for line in data.splitlines())
        item.filename = name
        z.writestr(item, data)
print('[gpu_wheels] wrote', dst)
PYEOF
done

echo "[gpu_wheels] dependencies for Python $TARGET (binary wheels)"
# mila_det's requirements minus mmcv (built above), resolved for TARGET.
"$PY" -m pip download --quiet --dest "$DIR" --only-binary=:all: \
    --python-version "$TARGET" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any \
    "mmengine==0.10.7" "mmdet==3.3.0" pycocotools numpy \
    addict packaging Pillow pyyaml yapf opencv-python "setuptools<81"
echo "[gpu_wheels] done: $(ls "$DIR" | wc -l) wheels in $DIR for Python $TARGET"
