#!/usr/bin/env bash
# Re-parameterize, then mmdeploy: the demo's models through mmdeploy 1.3.1 and ONNX Runtime.
#
# Usage: tools/mmdeploy_check.sh [--plan]        (make deploy-check runs it, after make demo)
#   --plan   run nothing: print every command a real run would execute now ("[plan] ..."), the
#            environment build included. tests/test_mmdeploy_plan.py checks that plan.
#
# mmdeploy 1.3.1 needs the TorchScript ONNX exporter of an older torch (torch 2.14 lacks
# torch.onnx.symbolic_opset9._cast_Long), so it runs in a second venv with the version set of
# docs/deploy.md ("mmdeploy, in its own environment"), built once; the mmcv build is cached like
# tools/install_deps.sh does it, under a key that names mmcv, torch, Python and the ops.
#
# Then, for the Faster R-CNN and the PSPNet that `make demo` trained and re-parameterized, and
# for two routes each:
#   deployed     deploy.pth + deploy_config.py, with `import orepa_mm` blocked (the deployed
#                checkpoint is a stock OpenMMLab model: the route fails if anything imports it);
#   train-time   the train config + checkpoint, orepa_mm importable (PYTHONPATH=repo), so
#                mmdeploy itself calls model.backbone.switch_to_deploy() before export;
# it runs mmdeploy's torch2onnx, the metric of the ONNX model in ONNX Runtime and the metric of
# the PyTorch model (both through mmdeploy's test runner, batch size 1, the demo's val images),
# each step timed, and prints one table: metric in PyTorch, in ONNX Runtime, and the difference.
# The deploy configs are mmdeploy's own, shipped flattened under configs/deploy/.
#
# Environment knobs:
#   MMDEPLOY_VENV   the second venv (default: .venv-mmdeploy in the repository)
#   PYTHON          interpreter that creates it (default python3; Python 3.8-3.11: torch 2.1.2)
#   DEMO_DIR        where make demo left its models (default: work_dirs/demo)
#   OREPA_MM_CACHE  wheel cache outside the clone (default: $XDG_CACHE_HOME or ~/.cache, /orepa_mm)
#   MAX_JOBS        parallel compile jobs for mmcv (default: number of cores)
set -euo pipefail

PLAN=0
if [[ ${1:-} == --plan ]]; then PLAN=1; shift; fi
if (($#)); then
  echo "usage: tools/mmdeploy_check.sh [--plan] (unknown argument: $1)" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONSTRAINTS="$ROOT/requirements/constraints.txt"
VENV=${MMDEPLOY_VENV:-$ROOT/.venv-mmdeploy}
[[ $VENV == /* ]] || VENV="$PWD/$VENV"
BASE_PY=${PYTHON:-python3}
DEMO_DIR=${DEMO_DIR:-$ROOT/work_dirs/demo}
[[ $DEMO_DIR == /* ]] || DEMO_DIR="$PWD/$DEMO_DIR"
CACHE=${OREPA_MM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orepa_mm}
PY="$VENV/bin/python"
DRIVER="$ROOT/tools/mmdeploy_check.py"
OUT="$DEMO_DIR/mmdeploy"

# The verified version set (docs/deploy.md); torch and torchvision are a matching pair.
TORCH_VERSION=2.1.2
TORCHVISION_VERSION=0.16.2
MMENGINE_VERSION=0.10.7
MMCV_VERSION=2.1.0
STACK=(mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 mmdeploy==1.3.1 onnx==1.14.1
  onnxruntime==1.15.1 protobuf==3.20.2 ftfy regex)

SAY_TAG=deploy-check
# say, have, run (--plan) and run_pip (always with the constraints), shared with install_deps.sh
# shellcheck source=tools/shell_lib.sh
source "$ROOT/tools/shell_lib.sh"
# A timed step: its wall time (and failure) goes to the log and to the table's footer; returns
# the command's status, so the caller decides whether to go on.
step() {
  local name=$1
  shift
  local t0 status=0 secs
  t0=$(date +%s.%N)
  run "$@" || status=$?
  if ! ((PLAN)); then
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }')
    ((status == 0)) || secs="$secs (failed, exit $status)"
    say "$name: $secs"
    printf '%s\t%s\n' "$name" "$secs" >>"$OUT/step_times.tsv"
  fi
  return "$status"
}

# 0. The demo's models, or one sentence and exit 2 (before any build: nothing to check yet).
for task in faster_rcnn pspnet; do
  if [[ ! -f $DEMO_DIR/$task/demo_result.json ]]; then
    echo "error: $DEMO_DIR/$task/demo_result.json is missing: run \`make demo\` first" \
      "(it trains and re-parameterizes the models this check exports)." >&2
    exit 2
  fi
done

# Step times of this run (the table's footer).
run mkdir -p "$OUT"
((PLAN)) || : >"$OUT/step_times.tsv"

# 1. The venv, ignored by git from inside (.venv-mmdeploy is not in the project's .gitignore).
if [[ ! -x $PY ]]; then
  say "creating $VENV with $BASE_PY"
  run "$BASE_PY" -m venv "$VENV"
  run sh -c "printf '*\\n' > '$VENV/.gitignore'"
fi
# The whole set, as installed: a venv with any other version is completed by the steps below.
VERSIONS_OK="import torch, torchvision, mmengine, mmcv, mmcv.ops, mmdet, mmseg, mmpretrain
import mmdeploy, onnx, onnxruntime
assert torch.__version__.split('+')[0] == '$TORCH_VERSION'
assert torchvision.__version__.split('+')[0] == '$TORCHVISION_VERSION'
assert (mmengine.__version__, mmcv.__version__) == ('$MMENGINE_VERSION', '$MMCV_VERSION')
found = [m.__version__ for m in (mmdet, mmseg, mmpretrain, mmdeploy, onnx, onnxruntime)]
assert found == ['3.3.0', '1.2.2', '1.2.0', '1.3.1', '1.14.1', '1.15.1'], found"
if have "$VERSIONS_OK"; then
  say "mmdeploy environment ready: $VENV"
else
  # 2. Build tools (mmcv's setup.py needs pkg_resources: setuptools < 81 via the constraints).
  if ! have 'import setuptools, wheel, ninja, pkg_resources, packaging'; then
    say "build tools: setuptools<81, wheel, ninja"
    run_pip install -q setuptools wheel ninja packaging
  fi
  # 3. torch 2.1.2 + torchvision 0.16.2 (PyPI's CUDA build: ~2.5 GB of nvidia-* wheels).
  if ! have "import torch, torchvision
assert torch.__version__.split('+')[0] == '$TORCH_VERSION'"; then
    say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    run_pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
  if ((PLAN)) && [[ ! -x $PY ]]; then
    TORCH_KEY=$TORCH_VERSION
    PY_TAG=$("$BASE_PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  else
    TORCH_KEY=$("$PY" -c 'import torch; print(torch.__version__)')
    PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  fi
  # 4. mmengine 0.10.7 and numpy 1.
  if ! have "import mmengine; assert mmengine.__version__ == '$MMENGINE_VERSION'"; then
    say "mmengine $MMENGINE_VERSION"
    run_pip install -q "mmengine==$MMENGINE_VERSION" numpy
  fi
  # 5. mmcv 2.1.0 with ops, from the wheel cache of tools/install_deps.sh (same layout; this
  #    torch is another key). C++17, as mmcv asks, is right for torch 2.1.
  if ! have "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'"; then
    if [[ ${FORCE_CUDA:-0} == 1 ]] ||
      have 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
      OPS=cuda-ops
    else
      OPS=cpu-ops
    fi
    WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VERSION/torch-${TORCH_KEY//+/_}/$PY_TAG/$OPS"
    if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
      say "building mmcv $MMCV_VERSION with $OPS for torch $TORCH_KEY ($PY_TAG):" \
        "~20 min on 2 cores, once"
      SRC=$(mktemp -d)
      trap 'rm -rf "$SRC"' EXIT
      run_pip download -q --no-deps --no-build-isolation --no-binary :all: \
        "mmcv==$MMCV_VERSION" -d "$SRC"
      run tar -xzf "$SRC/mmcv-$MMCV_VERSION.tar.gz" -C "$SRC"
      if ((PLAN)); then
        printf '[plan] cd %s && export MMCV_WITH_OPS=1 MAX_JOBS=%s\n' "$SRC/mmcv-$MMCV_VERSION" \
          "${MAX_JOBS:-$(nproc)}"
        run_pip wheel -q --no-build-isolation --no-deps -w "$SRC/dist" .
      else
        (cd "$SRC/mmcv-$MMCV_VERSION" && export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} &&
          step "build mmcv $MMCV_VERSION" \
            run_pip wheel -q --no-build-isolation --no-deps -w "$SRC/dist" .)
        # Publish atomically so an interrupted build never leaves a half wheel in the cache.
        mkdir -p "$WHEEL_DIR"
        built=$(ls "$SRC"/dist/mmcv-*.whl)
        cp "$built" "$WHEEL_DIR/.tmp.whl" &&
          mv "$WHEEL_DIR/.tmp.whl" "$WHEEL_DIR/$(basename "$built")"
      fi
    else
      say "reusing cached mmcv wheel from $WHEEL_DIR"
    fi
    WHEEL="$WHEEL_DIR/mmcv-$MMCV_VERSION-$PY_TAG-$PY_TAG-linux_x86_64.whl"
    ((PLAN)) || WHEEL=$(ls "$WHEEL_DIR"/mmcv-*.whl)
    run_pip install -q --force-reinstall --no-deps "$WHEEL"
    run_pip install -q "$WHEEL"  # its pure-Python dependencies
  fi
  # 6. The downstream libraries, mmdeploy and its ONNX pair. No orepa_mm: the train-time route
  #    gets it from PYTHONPATH, the deployed route must work without it.
  say "${STACK[*]}"
  run_pip install -q "${STACK[@]}"
  if ! ((PLAN)) && ! have "$VERSIONS_OK"; then
    why=$("$PY" -c "$VERSIONS_OK" 2>&1 | tail -n 1)
    echo "error: $VENV does not import the mmdeploy version set ($why);" \
      "delete $VENV and re-run tools/mmdeploy_check.sh." >&2
    exit 1
  fi
fi

# 7. torch2onnx, ONNX Runtime metric, PyTorch metric: per task and route, each step timed.
DEPLOY_CFG_faster_rcnn="$ROOT/configs/deploy/detection_onnxruntime_dynamic.py"
DEPLOY_CFG_pspnet="$ROOT/configs/deploy/segmentation_onnxruntime_dynamic.py"
for task in faster_rcnn pspnet; do
  deploy_cfg_var="DEPLOY_CFG_$task"
  deploy_cfg=${!deploy_cfg_var}
  for route in deployed train-time; do
    # model config and checkpoint of this route, as the demo recorded them
    paths=$("$BASE_PY" "$DRIVER" paths "$DEMO_DIR/$task" "$route")
    IFS=$'\t' read -r model_cfg checkpoint <<<"$paths"
    work="$OUT/$route/$task"
    if [[ $route == deployed ]]; then
      # nothing on PYTHONPATH, and the driver makes `import orepa_mm` raise
      env_cmd=(env -u PYTHONPATH "$PY" "$DRIVER" --block-orepa-mm)
    else
      env_cmd=(env "PYTHONPATH=$ROOT" "$PY" "$DRIVER" --import-orepa-mm)
    fi
    run rm -rf "$work"  # no metric of an earlier run survives a failed step
    # A failed step is recorded and the others still run: the table shows what works.
    if step "$route $task: torch2onnx" \
      "${env_cmd[@]}" torch2onnx "$deploy_cfg" "$model_cfg" "$checkpoint" "$work"; then
      step "$route $task: test ONNX Runtime" \
        "${env_cmd[@]}" test "$deploy_cfg" "$model_cfg" "$work/end2end.onnx" "$work" \
        "$work/ort.json" || true
    fi
    step "$route $task: test PyTorch" \
      "${env_cmd[@]}" test "$deploy_cfg" "$model_cfg" "$checkpoint" "$work" \
      "$work/pytorch.json" || true
  done
done
# The table; exit 1 unless every row has both metrics.
run "$BASE_PY" "$DRIVER" table "$OUT"
