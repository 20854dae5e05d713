#!/usr/bin/env bash
# The GPU check: one prepared script for the lent GPU machine (one command, <= ~9 min).
#
#   bash tools/gpu_check.sh             # on the GPU machine (docs/development.md#gpu-check)
#   bash tools/gpu_check.sh --dry-run   # the same checks on the CPU at toy sizes (the test suite
#                                       # runs this, so no check of it is untested)
#   bash tools/gpu_check.sh --plan      # run nothing: print every command of the GPU path
#
# Set-up, where $PY lacks the mm stack (the lent machine: no network, python3 3.12 with torch
# 2.11.0+cu130, numpy 2.x, nvcc 13.0, no mm package): install the kit that `make gpu-kit` made
# here (pip --no-index --find-links, no dependency resolution: the kit holds exactly what the
# machine lacks) and build mmcv 2.1.0's ops for this GPU only (TORCH_CUDA_ARCH_LIST=9.0,
# MAX_JOBS=16, mmcv's -std=c++17, which torch 2.11 accepts; -std=c++20 from torch 2.12 on).
# The checks, most important first, each given what is left of the time budget:
# 1. the CUDA tests: first the sync-debug check (a training step with frozen stages and an eval
#    forward under torch.cuda.set_sync_debug_mode('error'), the stock ResNet as the control),
#    then fp32 (TF32 off and on), autocast, torch.compile, 1-GPU DDP, .data writes
#    (tests/test_cuda.py and the CUDA variants of the layer and compile tests);
# 2. tools/reparameterize.py --device cuda on a demo-sized Faster R-CNN with random weights;
# 3. tools/benchmark.py --device cuda: ResNet-50 classification (batch 64, 224) plain / OREPA,
#    eager and compiled, then detection (batch 2, 800x1216) plain / OREPA eager: the GPU table.
# $OUT (default work_dirs/gpu_check) gets at most 8 files (what the device tool brings back):
# gpu_check.log (everything printed), summary.txt (each step's status and seconds, then the
# tables; also the last lines printed), mmcv_build.log, benchmark_{cls,det}.json. The rest
# (checkpoints, plots) stays in $GPU_CHECK_WORK (the dry run: $OUT itself).
#
# Knobs: PY (default .venv/bin/python if present, else python3), GPU_KIT (.whl/gpu_kit),
# GPU_CHECK_BUDGET_S (570: the whole command, inside the device tool's 600 s), MAX_JOBS (16),
# TORCH_CUDA_ARCH_LIST (9.0: H100 / H200).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=device
case ${1:-} in
  '') ;;
  --dry-run) MODE=dry ;;
  --plan) MODE=plan ;;
  *) echo "gpu_check: unknown option '$1'; pass --dry-run, --plan or nothing." >&2; exit 2 ;;
esac
if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-work_dirs/gpu_check}
KIT=${GPU_KIT:-.whl/gpu_kit}
CONSTRAINTS="$ROOT/requirements/constraints.txt"
MMCV_VERSION=2.1.0
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
JOBS=${MAX_JOBS:-16}
SRC=${TMPDIR:-/tmp}/gpu_check_mmcv
MM_STACK='import mmengine, mmcv.ops, mmdet, mmseg, mmpretrain'
# mmcv's CUDA ops run (an mmcv built without them imports, then fails on the first CUDA op).
MMCV_CUDA="import torch; from mmcv.ops import nms; t = lambda *x: torch.tensor(x, device='cuda')
print('mmcv CUDA nms keeps', nms(t([0., 0, 2, 2], [0, 0, 2, 2.1]), t(1., .5), .5)[1].tolist())"
if [[ $MODE == dry ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-3600}
  WORK=${GPU_CHECK_WORK:-$OUT}
  DEVICE=cpu
else
  BUDGET=${GPU_CHECK_BUDGET_S:-570}
  WORK=${GPU_CHECK_WORK:-work_dirs/gpu_check_work}
  DEVICE=cuda
fi
# orepa_mm runs from this checkout (the lent machine has no editable install).
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

say() { printf '\n[gpu_check %4ds] %s\n' "$SECONDS" "$*"; }
have() { "$PY" -c "$1" >/dev/null 2>&1; }
left() { echo $((BUDGET - SECONDS)); }
refuse() { echo "gpu_check: $*" >&2; exit 2; }
# STATUS SECONDS WHAT: one line of summary.txt.
note() { [[ $MODE == plan ]] || printf '%-10s %5ss  %s\n' "$1" "$2" "$3" >>"$OUT/summary.txt"; }

# step LABEL LOG MIN_S MAX_S CMD...: run CMD (stdout and stderr into LOG too) for at most
# MAX_S seconds and what the budget leaves; skip it when less than MIN_S is left. Never stops
# the script: the status goes to summary.txt and into FAILED.
FAILED=0
step() {
  local label=$1 log=$2 min=$3 max=$4
  shift 4
  say "$label"
  if [[ $MODE == plan ]]; then
    printf '[plan] (at most %ss, output > %s)\n' "$max" "$log"
    if [[ $(type -t "$1") == function ]]; then "$@"; else run "$@"; fi
    return 0
  fi
  local t start=$SECONDS rc
  t=$(left)
  ((t < max)) || t=$max
  if ((t < min)); then
    echo "skipped: ${t}s of the ${BUDGET}s budget left, it needs ${min}s"
    note skipped 0 "$label"
    FAILED=1
    return 0
  fi
  # timeout runs a program, so this script's functions run in a child bash (export -f below).
  set +e
  timeout "$t" bash -c '"$@"' _ "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  local status=ok
  if ((rc == 124)); then status=timed-out; elif ((rc != 0)); then status=failed:$rc; fi
  ((rc == 0)) || FAILED=1
  # The log's last line says most (pytest's counts, the nms check, the JSON written).
  note "$status" $((SECONDS - start)) "$label | $(tail -n 1 "$log" | cut -c 1-200)"
  return 0
}
# Run a command, or under --plan only print it (expanded).
run() {
  if [[ $MODE == plan ]]; then printf '[plan] %s\n' "$*"; else "$@"; fi
}
pip_() { run "$PY" -m pip --disable-pip-version-check "$1" -c "$CONSTRAINTS" "${@:2}"; }

# ---- set-up (device path only) ---------------------------------------------------------------
# Install from the kit, offline: setuptools < 81 first (mmcv's setup.py imports pkg_resources).
install_kit() {
  pip_ install -q --no-index --find-links "$KIT" --no-deps setuptools &&
    pip_ install -q --no-index --find-links "$KIT" --no-deps -r "$KIT/requirements.txt"
}
# The C++ standard mmcv's ops compile with: mmcv 2.1.0 asks -std=c++17, which torch 2.11's
# headers accept; torch >= 2.12 requires C++20.
cxx_std() {
  TV=$1 "$PY" -c 'import os; v = tuple(map(int, os.environ["TV"].split("+")[0].split(".")[:2]))
print("c++20" if v >= (2, 12) else "c++17")'
}
# In the source folder (mmcv's setup.py reads files relative to it); -v: the compile lines
# go to mmcv_build.log.
build_mmcv() {
  run rm -rf "$SRC" && run mkdir -p "$SRC" &&
    run tar -xzf "$KIT/mmcv-$MMCV_VERSION.tar.gz" -C "$SRC" &&
    { [[ $CXX_STD == c++17 ]] ||
      run sed -i "s/'-std=c++17'/'-std=$CXX_STD'/g" "$SRC/mmcv-$MMCV_VERSION/setup.py"; } &&
    run env -C "$SRC/mmcv-$MMCV_VERSION" MMCV_WITH_OPS=1 FORCE_CUDA=1 \
      TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" CPATH="$BUILD_CPATH" \
      "$PY" -m pip --disable-pip-version-check install -c "$CONSTRAINTS" -v --no-index \
      --no-build-isolation --no-deps . &&
    run "$PY" -c "$MMCV_CUDA"
}

# Refusals come before anything is written: no GPU, another GPU than the build targets, no mm
# stack and no kit, no nvcc. Sets MM_READY (the mm stack, mmcv's CUDA ops included, runs).
validate_device() {
  MM_READY=0
  if [[ $MODE != plan ]]; then
    have 'import sys, torch; sys.exit(not torch.cuda.is_available())' ||
      refuse "torch in $PY sees no CUDA device; run this on the GPU machine, or pass --dry-run."
    local cap
    cap=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    [[ $cap == "$ARCH" ]] ||
      refuse "this GPU is compute capability $cap, not $ARCH; set TORCH_CUDA_ARCH_LIST=$cap."
    if have "$MM_STACK; $MMCV_CUDA"; then MM_READY=1; return 0; fi
  fi
  [[ -f $KIT/requirements.txt && -f $KIT/mmcv-$MMCV_VERSION.tar.gz ]] ||
    refuse "$PY lacks the mm stack and $KIT holds no GPU kit; run 'make gpu-kit' where there" \
      "is network and carry $KIT to this machine (docs/development.md#gpu-check)."
  [[ $MODE == plan ]] || command -v nvcc >/dev/null ||
    refuse "nvcc is not on PATH, so mmcv's CUDA ops cannot be built; add the CUDA toolkit's bin."
}

setup_device() {
  if ((MM_READY)); then
    say "setup: the mm stack is installed in $PY (mmcv with CUDA ops); nothing to install"
    return 0
  fi
  # Without torch (only --plan gets here so), the GPU machine's torch 2.11.0 is assumed.
  local torch_version site
  read -r torch_version site < <("$PY" -c 'import os, torch
print(torch.__version__, os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null ||
    echo 2.11.0 '<site-packages>')
  CXX_STD=$(cxx_std "$torch_version")
  # torch's CUDA 13 wheels carry headers (cusparse, cublas, ...) that nvcc looks for.
  BUILD_CPATH=${CPATH:-}
  if [[ $MODE == plan || -d $site/nvidia/cu13/include ]]; then
    BUILD_CPATH=$site/nvidia/cu13/include${CPATH:+:$CPATH}
  fi
  export CXX_STD BUILD_CPATH
  say "setup: install the kit offline, then build mmcv $MMCV_VERSION's ops for" \
    "sm_${ARCH/./} (torch $torch_version: -std=$CXX_STD)"
  step "setup: install the kit ($KIT) offline" "$WORK/install.log" 10 120 install_kit
  # What the budget leaves after 150 s for the checks (the sync-debug check first): a build
  # that cannot finish in it is stopped.
  step "setup: build mmcv $MMCV_VERSION's ops for sm_${ARCH/./} (MAX_JOBS=$JOBS)" \
    "$OUT/mmcv_build.log" 60 $(($(left) - 150)) build_mmcv
  [[ $MODE == plan ]] || have "$MM_STACK; $MMCV_CUDA" || {
    say "mmcv's CUDA ops are not usable (see $OUT/mmcv_build.log); the checks import mmdet," \
      "which imports mmcv.ops, so none of them ran."
    note skipped 0 "1/3-3/3: every check (no mmcv.ops)"
    finish
  }
}

# ---- the checks --------------------------------------------------------------------------------
# A random-weight demo Faster R-CNN checkpoint, then its float64-verified deploy conversion.
reparameterize() {
  run "$PY" - "$WORK" <<'PYEOF' &&
import sys, torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
import orepa_mm  # noqa: F401
from mmdet.registry import MODELS
cfg = Config.fromfile('configs/demo/faster_rcnn_orepa_r18_demo.py')
init_default_scope('mmdet')
cfg.model.backbone.init_cfg = None
torch.manual_seed(0)
model = MODELS.build(cfg.model)
torch.save(dict(state_dict=model.state_dict(), meta=dict()),
           f'{sys.argv[1]}/random_demo_detector.pth')
PYEOF
    run "$PY" tools/reparameterize.py configs/demo/faster_rcnn_orepa_r18_demo.py \
      "$WORK/random_demo_detector.pth" --out "$WORK/deploy" --device "$DEVICE"
}

export -f run install_kit build_mmcv reparameterize pip_
export MODE PY KIT CONSTRAINTS MMCV_VERSION MMCV_CUDA ARCH JOBS SRC WORK DEVICE

# Everything printed goes to summary.txt's tables and ends the run; exit 1 if a step failed.
finish() {
  if [[ $MODE != plan ]]; then
    local f
    for f in cls det; do
      if [[ -f $WORK/benchmark_$f/benchmark.json ]]; then
        cp "$WORK/benchmark_$f/benchmark.json" "$OUT/benchmark_$f.json"
      fi
    done
    # The benchmark tables: from the environment line above each header to the log's end.
    for f in "$WORK"/benchmark_*.log; do
      if [[ -f $f ]]; then
        awk '/^workload/ { print prev; on = 1 } on { print } { prev = $0 }' "$f" \
          >>"$OUT/summary.txt"
      fi
    done
    say "done: logs in $OUT, everything else in $WORK; summary:"
    cat "$OUT/summary.txt"
  fi
  exit $FAILED
}

if [[ $MODE == dry ]]; then
  TESTS=(tests/test_cuda.py)
  BENCH_CLS=(--models resnet18 --workloads cls --batch-size 2 --input-size 64 64 --steps 1
             --warmup 1 --variants plain orepa --modes eager compiled
             --compile-backend aot_eager)
  BENCH_DET=()
else
  TESTS=(tests/test_cuda.py tests/test_orepa_conv.py tests/test_compile.py)
  BENCH_CLS=(--models resnet50 --workloads cls --batch-size 64 --steps 10 --warmup 3
             --variants plain orepa --modes eager compiled --compiled-variants plain orepa)
  BENCH_DET=(--models resnet50 --workloads det --batch-size 2 --steps 10 --warmup 3
             --variants plain orepa --modes eager)
fi

[[ $MODE == dry ]] || validate_device
if [[ $MODE != plan ]]; then
  mkdir -p "$OUT" "$WORK"
  : >"$OUT/summary.txt"
  : >"$OUT/gpu_check.log"
  exec > >(tee -a "$OUT/gpu_check.log") 2> >(tee -a "$OUT/gpu_check.log" >&2)
  say "gpu_check $MODE: $PY, budget ${BUDGET}s, logs in $OUT"
fi
[[ $MODE == dry ]] || setup_device

# The dry run keeps its old folder names (the suite checks them); the device keeps one per part.
if [[ $MODE == dry ]]; then BENCH_OUT=$WORK/benchmark; else BENCH_OUT=$WORK/benchmark_cls; fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
SYNC="the sync-debug check (a training step with frozen stages and an eval forward under"
SYNC+=" torch.cuda.set_sync_debug_mode('error'), the stock ResNet as the control)"
step "1/3 CUDA tests: $SYNC" "$WORK/sync_check.log" 30 150 \
  "${PYTEST[@]}" tests/test_cuda.py -k make_no_sync
REST="the rest (fp32 / TF32 against float64, compile, DDP, .data writes, CUDA layer tests)"
step "1/3 CUDA tests: $REST" "$WORK/tests.log" 60 240 \
  "${PYTEST[@]}" "${TESTS[@]}" -k '(cuda or CUDA) and not make_no_sync'
step "2/3 tools/reparameterize.py --device $DEVICE" "$WORK/reparameterize.log" 30 120 reparameterize
step "3/3 tools/benchmark.py --device $DEVICE: classification" "$WORK/benchmark_cls.log" 60 300 \
  "$PY" tools/benchmark.py --device "$DEVICE" --out "$BENCH_OUT" "${BENCH_CLS[@]}"
if ((${#BENCH_DET[@]})); then
  step "3/3 tools/benchmark.py --device $DEVICE: detection" "$WORK/benchmark_det.log" 60 300 \
    "$PY" tools/benchmark.py --device "$DEVICE" --out "$WORK/benchmark_det" "${BENCH_DET[@]}"
fi
finish
