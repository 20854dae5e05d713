#!/usr/bin/env bash
# Install the orepa_mm stack into a Python environment, idempotently.
#
# Usage: tools/install_deps.sh PYTHON
#   PYTHON   interpreter of the target environment (make install passes .venv/bin/python).
#
# Order matters: torch+torchvision -> mmengine -> mmcv (built from source with ops, cached)
# -> mmdet / mmsegmentation / mmpretrain -> test tools -> orepa_mm (editable) -> its fused
# CPU kernel ops (compiled in place).
# Every step first checks whether what it would install is already there, so a second run
# takes seconds.
#
# Environment knobs:
#   TORCH_SPEC      pip requirement(s) for torch when none is installed
#                   (default: "torch==2.14.1 torchvision==0.29.1", a matching pair)
#   MMCV_VERSION    mmcv release to build (default 2.1.0, what mmdet 3.3 / mmseg 1.2 accept)
#   OREPA_MM_CACHE  wheel cache outside the clone (default: $XDG_CACHE_HOME or ~/.cache, /orepa_mm)
#   MAX_JOBS        parallel compile jobs for mmcv (default: number of cores)
set -euo pipefail

PY=${1:?usage: tools/install_deps.sh PYTHON}
# Absolute path (the mmcv build runs in another folder); keep the venv's symlink unresolved.
if [[ $PY == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
MMCV_VERSION=${MMCV_VERSION:-2.1.0}
CACHE=${OREPA_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orepa_mm}
PIP=("$PY" -m pip --disable-pip-version-check)
# pip warns once per missing folder of a local find-links index; those lines are noise.
pip_() { "${PIP[@]}" "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

say() { printf '[install] %s\n' "$*"; }
have() { "$PY" -c "$1" >/dev/null 2>&1; }

# 1. Build tooling: mmcv 2.1.0's setup.py and mmengine 0.10.7 (at run time) import
#    pkg_resources, which setuptools 81 removed. Other installs may upgrade setuptools (torch
#    asks for a recent one), so this is re-checked at the end.
ensure_build_tools() {
  if ! have 'import setuptools, wheel, ninja, pkg_resources, sys; from packaging.version import Version as V; sys.exit(V(setuptools.__version__) >= V("81"))'; then
    say "build tools: setuptools<81, wheel, ninja"
    pip_ install -q "setuptools<81" wheel ninja packaging
  fi
}
ensure_build_tools

# 2. torch + torchvision: keep whatever pair the environment already has.
if have 'import torch, torchvision'; then
  say "torch present: $("$PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
else
  say "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  pip_ install -q $TORCH_SPEC
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# 3. mmengine and the numpy the mm stack supports (mmcv's runtime deps come with it).
if ! have 'import mmengine, numpy; assert mmengine.__version__.startswith("0.10."); assert int(numpy.__version__.split(".")[0]) < 2'; then
  say "mmengine 0.10.x"
  pip_ install -q "mmengine>=0.10.4,<0.11" "numpy<2"
fi

# 4. mmcv with compiled ops, from a wheel cache keyed by mmcv, torch and Python versions.
mmcv_ok() { have "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'"; }
if mmcv_ok; then
  say "mmcv $MMCV_VERSION with ops present"
else
  WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VERSION/torch-${TORCH_VERSION//+/_}/$PY_TAG"
  mkdir -p "$WHEEL_DIR"
  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    say "building mmcv $MMCV_VERSION with ops for torch $TORCH_VERSION ($PY_TAG): ~25 min on 2 cores, once"
    SRC=$(mktemp -d)
    trap 'rm -rf "$SRC"' EXIT
    pip_ download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$SRC"
    tar -xzf "$SRC"/mmcv-"$MMCV_VERSION".tar.gz -C "$SRC"
    # The C++ standard the installed torch's headers need (torch >= 2.10 needs C++20; mmcv asks 17).
    CXX_STD=$("$PY" -c 'import torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); print("c++20" if v >= (2, 10) else "c++17")')
    sed -i "s/'-std=c++17'/'-std=$CXX_STD'/g" "$SRC/mmcv-$MMCV_VERSION/setup.py"
    (cd "$SRC/mmcv-$MMCV_VERSION" &&
      MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        pip_ wheel -q --no-build-isolation --no-deps -w "$SRC/dist" .)
    # Publish atomically so an interrupted build never leaves a half wheel in the cache.
    built=$(ls "$SRC"/dist/mmcv-*.whl)
    cp "$built" "$WHEEL_DIR/.tmp.whl" && mv "$WHEEL_DIR/.tmp.whl" "$WHEEL_DIR/$(basename "$built")"
  else
    say "reusing cached mmcv wheel from $WHEEL_DIR"
  fi
  pip_ install -q --force-reinstall --no-deps "$WHEEL_DIR"/mmcv-*.whl
  pip_ install -q "$WHEEL_DIR"/mmcv-*.whl  # its pure-Python dependencies
  if ! mmcv_ok; then
    why=$("$PY" -c 'import mmcv.ops' 2>&1 | tail -n 1)
    echo "[install] error: mmcv $MMCV_VERSION was installed but 'import mmcv.ops' fails ($why); delete $WHEEL_DIR and re-run make install to rebuild it for torch $TORCH_VERSION." >&2
    exit 1
  fi
fi

# 5. The downstream libraries, test tools, and orepa_mm itself.
if ! have 'import mmdet, mmseg, mmpretrain, ftfy, regex, pycocotools, pytest, hypothesis, matplotlib, onnx, onnxruntime, orepa_mm'; then
  say "mmdet, mmsegmentation, mmpretrain, test tools, orepa_mm (editable)"
  pip_ install -q -r "$ROOT/requirements.txt"
  pip_ install -q --no-build-isolation --no-deps -e "$ROOT"
fi
ensure_build_tools

# 6. The fused CPU loops of kernel generation (orepa_mm/csrc, ~30 s to compile). Optional:
#    without them orepa_mm uses its PyTorch path (same numbers, slower on CPU).
if ! have 'import orepa_mm._kxk_kernel_ops'; then
  say "fused CPU kernel ops (orepa_mm/csrc)"
  LOG="$ROOT/build/kxk_kernel_ops.log"
  mkdir -p "$ROOT/build"
  if ! (cd "$ROOT" && "$PY" setup.py build_ext --inplace) >"$LOG" 2>&1; then
    say "warning: the fused kernel ops did not compile (see $LOG); orepa_mm falls back to PyTorch ops."
  fi
fi
say "ready: $("$PY" -W ignore -c 'import pkg_resources, torch, mmcv, mmdet, mmseg, mmpretrain; print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}")')"
