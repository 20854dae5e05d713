#!/usr/bin/env bash
# The GPU check: one prepared script for a machine with a CUDA GPU (about 5-8 min on one GPU).
#
#   bash tools/gpu_check.sh               # on the GPU machine, after `make install`
#   bash tools/gpu_check.sh --dry-run     # the same steps on the CPU at toy sizes (the test
#                                         # suite runs this, so no step of it is untested)
#
# 1. the CUDA tests: fp32 (TF32 off and on), fp16/bf16 autocast, torch.compile, 1-GPU DDP,
#    no host-device sync in a training step or eval forward (sync debug mode "error"),
#    eval sees .data writes (tests/test_cuda.py and the CUDA variants of the layer tests);
# 2. tools/reparameterize.py --device cuda on a demo-sized Faster R-CNN with random weights
#    (float64 verification on the GPU, fp32/TF32 agreement reported beside it);
# 3. tools/benchmark.py --device cuda: ResNet-50 classification (batch 64, 224) and detection
#    (batch 2, 800x1216), plain / DBB / OREPA, eager, plus plain / OREPA compiled; one table.
# Everything goes to $OUT (default work_dirs/gpu_check); the last lines are the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-work_dirs/gpu_check}
DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
mkdir -p "$OUT"
step() { printf '\n[gpu_check %4ds] %s\n' "$SECONDS" "$*"; }

if ((DRY)); then
  DEVICE=cpu
  TEST_SELECT=(tests/test_cuda.py)
  BENCH=(--models resnet18 --workloads cls --batch-size 2 --input-size 64 64 --steps 1
         --warmup 1 --variants plain orepa --modes eager compiled --compile-backend aot_eager)
else
  DEVICE=cuda
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: torch sees no CUDA device; run it on the GPU machine or pass --dry-run.")'
  TEST_SELECT=(tests/test_cuda.py tests/test_orepa_conv.py tests/test_compile.py -k 'cuda or CUDA')
  BENCH=(--models resnet50 --workloads cls det --batch-size cls=64 det=2 --steps 10 --warmup 3
         --variants plain dbb orepa --modes eager compiled --compiled-variants plain orepa)
fi

step "1/3 CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider "${TEST_SELECT[@]}" 2>&1 | tee "$OUT/tests.log"

step "2/3 tools/reparameterize.py --device $DEVICE"
"$PY" - "$OUT" <<'PYEOF'
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
torch.save(dict(state_dict=model.state_dict(), meta=dict()), f'{sys.argv[1]}/random_demo_detector.pth')
PYEOF
"$PY" tools/reparameterize.py configs/demo/faster_rcnn_orepa_r18_demo.py \
  "$OUT/random_demo_detector.pth" --out "$OUT/deploy" --device "$DEVICE" 2>&1 | tee "$OUT/reparameterize.log"

step "3/3 tools/benchmark.py --device $DEVICE"
"$PY" tools/benchmark.py --device "$DEVICE" --out "$OUT/benchmark" "${BENCH[@]}" 2>&1 | tee "$OUT/benchmark.log"
step "done: logs in $OUT"
