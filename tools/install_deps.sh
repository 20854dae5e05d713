#!/usr/bin/env bash
# Install the orepa_mm stack into a Python environment, idempotently.
#
# Usage: tools/install_deps.sh [--plan] PYTHON
#   PYTHON   interpreter of the target environment (make install passes .venv/bin/python).
#   --plan   install nothing: print every command a real run would execute now ("[plan] ..."),
#            the mmcv build included. Tests use it to check that every pip call is constrained.
#
# Order matters: torch+torchvision -> mmengine -> mmcv (built from source with ops, cached)
# -> mmdet / mmsegmentation / mmpretrain -> test tools -> orepa_mm (editable) -> its fused
# CPU kernel ops (compiled in place) -> a one-line health report.
# Every step first checks whether what it would install is already there, so a second run
# takes seconds.
#
# Every pip call goes through run_pip, which passes requirements/constraints.txt (-c): a later
# install can never upgrade setuptools, numpy or opencv past what the mm stack supports.
#
# Environment knobs:
#   TORCH_SPEC      pip requirement(s) for torch when none is installed
#                   (default: "torch==2.14.1 torchvision==0.29.1", a matching pair)
#   MMCV_VERSION    mmcv release to build (default 2.1.0, what mmdet 3.3 / mmseg 1.2 accept)
#   OREPA_MM_CACHE  wheel cache outside the clone (default: $XDG_CACHE_HOME or ~/.cache, /orepa_mm)
#   MAX_JOBS        parallel compile jobs for mmcv (default: number of cores)
#   FORCE_CUDA=1    build mmcv's CUDA ops although no GPU is visible (needs nvcc); mmcv builds
#                   them by itself when torch sees a GPU
set -euo pipefail

PLAN=0
if [[ ${1:-} == --plan ]]; then PLAN=1; shift; fi
PY=${1:?usage: tools/install_deps.sh [--plan] PYTHON}
# Absolute path (the mmcv build runs in another folder); keep the venv's symlink unresolved.
if [[ $PY == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONSTRAINTS="$ROOT/requirements/constraints.txt"
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
MMCV_VERSION=${MMCV_VERSION:-2.1.0}
CACHE=${OREPA_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orepa_mm}

SAY_TAG=install
# say, have, run (--plan) and run_pip: the one way this script calls pip.
# shellcheck source=tools/shell_lib.sh
source "$ROOT/tools/shell_lib.sh"

# 1. Build tooling: mmcv 2.1.0's setup.py needs pkg_resources (setuptools < 81, capped by the
#    constraints for every later install too), wheel and ninja.
if ! have 'import setuptools, wheel, ninja, pkg_resources, packaging'; then
  say "build tools: setuptools<81, wheel, ninja"
  run_pip install -q setuptools wheel ninja packaging
fi

# 2. torch + torchvision: keep whatever pair the environment already has.
if have 'import torch, torchvision'; then
  say "torch present: $("$PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
  TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
else
  say "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  run_pip install -q $TORCH_SPEC
  if ((PLAN)); then
    TORCH_VERSION=$(sed -n 's/.*torch==\([^ ]*\).*/\1/p' <<<"$TORCH_SPEC")
    TORCH_VERSION=${TORCH_VERSION:-unknown}
  else
    TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
  fi
fi
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# 3. mmengine and the numpy the mm stack supports (mmcv's runtime deps come with it).
if ! have 'import mmengine, numpy; assert mmengine.__version__.startswith("0.10."); assert int(numpy.__version__.split(".")[0]) < 2'; then
  say "mmengine 0.10.x"
  run_pip install -q "mmengine>=0.10.4,<0.11" numpy
fi

# 4. mmcv with compiled ops, from a wheel cache keyed by mmcv, torch, Python and whether the
#    CUDA ops are in it (mmcv compiles them when torch sees a GPU, or with FORCE_CUDA=1).
mmcv_ok() { have "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'"; }
if mmcv_ok; then
  say "mmcv $MMCV_VERSION with ops present"
else
  if [[ ${FORCE_CUDA:-0} == 1 ]] || have 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    OPS=cuda-ops
  else
    OPS=cpu-ops
  fi
  WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VERSION/torch-${TORCH_VERSION//+/_}/$PY_TAG/$OPS"
  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    say "building mmcv $MMCV_VERSION with $OPS for torch $TORCH_VERSION ($PY_TAG): 13-26 min on 2 cores, once"
    SRC=$(mktemp -d)
    trap 'rm -rf "$SRC"' EXIT
    run_pip download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$SRC"
    run tar -xzf "$SRC/mmcv-$MMCV_VERSION.tar.gz" -C "$SRC"
    # The C++ standard the installed torch's headers need (torch >= 2.10 needs C++20; mmcv asks 17).
    CXX_STD=$(TV=$TORCH_VERSION "$PY" -c 'import os; v = tuple(int(x) for x in os.environ["TV"].split("+")[0].split(".")[:2]); print("c++20" if v >= (2, 10) else "c++17")' 2>/dev/null || echo c++20)
    run sed -i "s/'-std=c++17'/'-std=$CXX_STD'/g" "$SRC/mmcv-$MMCV_VERSION/setup.py"
    # pip wheel runs in the source folder (mmcv's setup.py reads files relative to it).
    if ((PLAN)); then
      printf '[plan] cd %s\n' "$SRC/mmcv-$MMCV_VERSION"
      run_pip wheel -q --no-build-isolation --no-deps -w "$SRC/dist" .
    else
      (cd "$SRC/mmcv-$MMCV_VERSION" && export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} &&
        run_pip wheel -q --no-build-isolation --no-deps -w "$SRC/dist" .)
      # Publish atomically so an interrupted build never leaves a half wheel in the cache.
      mkdir -p "$WHEEL_DIR"
      built=$(ls "$SRC"/dist/mmcv-*.whl)
      cp "$built" "$WHEEL_DIR/.tmp.whl" && mv "$WHEEL_DIR/.tmp.whl" "$WHEEL_DIR/$(basename "$built")"
    fi
  else
    say "reusing cached mmcv wheel from $WHEEL_DIR"
  fi
  WHEEL="$WHEEL_DIR/mmcv-$MMCV_VERSION-$PY_TAG-$PY_TAG-linux_x86_64.whl"
  ((PLAN)) || WHEEL=$(ls "$WHEEL_DIR"/mmcv-*.whl)
  run_pip install -q --force-reinstall --no-deps "$WHEEL"
  run_pip install -q "$WHEEL"  # its pure-Python dependencies
  if ! ((PLAN)) && ! mmcv_ok; then
    why=$("$PY" -c 'import mmcv.ops' 2>&1 | tail -n 1)
    echo "[install] error: mmcv $MMCV_VERSION was installed but 'import mmcv.ops' fails ($why); delete $WHEEL_DIR and re-run make install to rebuild it for torch $TORCH_VERSION." >&2
    exit 1
  fi
fi

# 5. The downstream libraries, test tools, and orepa_mm itself.
if ! have 'import mmdet, mmseg, mmpretrain, ftfy, regex, pycocotools, pytest, hypothesis, matplotlib, onnx, onnxruntime, orepa_mm'; then
  say "mmdet, mmsegmentation, mmpretrain, test tools, orepa_mm (editable)"
  run_pip install -q -r "$ROOT/requirements.txt"
  run_pip install -q --no-build-isolation --no-deps -e "$ROOT"
fi

# 6. The fused CPU loops of kernel generation (orepa_mm/csrc, ~30 s to compile). Optional:
#    without them orepa_mm uses its PyTorch path (same numbers, slower on CPU).
#    A module built from older sources counts as missing (fused_ops checks its OPS_VERSION).
if ! have 'import sys, warnings; warnings.simplefilter("ignore"); from orepa_mm.cnn.fused_ops import KXK_KERNEL_OPS; sys.exit(KXK_KERNEL_OPS is None)'; then
  say "fused CPU kernel ops (orepa_mm/csrc)"
  LOG="$ROOT/build/kxk_kernel_ops.log"
  if ((PLAN)); then
    printf '[plan] cd %s && %s setup.py build_ext --inplace\n' "$ROOT" "$PY"
  else
    mkdir -p "$ROOT/build"
    if ! (cd "$ROOT" && "$PY" setup.py build_ext --inplace) >"$LOG" 2>&1; then
      say "warning: the fused kernel ops did not compile (see $LOG); orepa_mm falls back to PyTorch ops."
    fi
  fi
fi

# 7. One line to paste into a bug report.
if ((PLAN)); then
  printf '[plan] %s -m orepa_mm.utils.env_report\n' "$PY"
else
  say "ready: $("$PY" -m orepa_mm.utils.env_report)"
fi
