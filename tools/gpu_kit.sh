#!/usr/bin/env bash
# Build the GPU kit: what the lent GPU machine lacks to run tools/gpu_check.sh, downloaded here.
#
# Usage: tools/gpu_kit.sh [--plan | --check] [KIT_DIR]      (make gpu-kit)
#   KIT_DIR  where the kit goes (default: .whl/gpu_kit, git-ignored through /.whl/; the device
#            tool takes it along with carry=[".whl/gpu_kit"], see docs/development.md#gpu-check)
#   --plan   download nothing: print every command a real run would execute ("[plan] ...").
#   --check  download nothing: run the closure check below on an existing KIT_DIR.
#
# The GPU machine has no network. Its python3 (3.12) holds torch 2.11.0+cu130, numpy 2.x,
# triton, nvcc 13.0, opencv-python-headless, matplotlib, scipy, pytest, ... but no mm package
# (.library/device/KINDS.md lists its packages; DEVICE_HAS below is that list). So the kit is:
#   - cp312 manylinux / py3-none wheels of mmengine, mmdet, mmsegmentation, mmpretrain and of
#     their needs that the machine lacks (KIT_DEPS), downloaded with --no-deps: a resolver
#     would also fetch what the machine has (numpy, opencv-python, scipy: ~100 MB), and the
#     machine's own numpy 2.x is kept (docs/development.md#gpu-check says why);
#   - setuptools<81: mmcv 2.1.0's setup.py and mmengine import pkg_resources;
#   - mmcv 2.1.0's sdist: its ops are compiled on the machine, for its GPU only;
#   - requirements.txt: name==version of each wheel, what gpu_check.sh installs.
# A closure check then reads every wheel's Requires-Dist (Python 3.12 on Linux, no extras):
# each need must be in the kit or in DEVICE_HAS, else the script stops naming it, so a new
# dependency cannot slip past the kit. The kit is built in KIT_DIR.tmp and moved into place
# only when complete. Every pip call takes requirements/constraints.txt (-c).
set -euo pipefail

PLAN=0
CHECK=0
case ${1:-} in
  --plan) PLAN=1; shift ;;
  --check) CHECK=1; shift ;;
  -*) echo "gpu_kit: unknown option '$1'; pass --plan, --check or nothing." >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIT=${1:-${GPU_KIT:-$ROOT/.whl/gpu_kit}}
# Any Python with pip runs the download (the target is set by the flags, not by it).
PY=${PY:-$ROOT/.venv/bin/python}
CONSTRAINTS="$ROOT/requirements/constraints.txt"
MM_PACKAGES=(mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0)
MMCV_VERSION=2.1.0
# What the four need beyond DEVICE_HAS (the closure check keeps this list honest); ftfy is
# imported by mmsegmentation without being declared (requirements/runtime.txt).
KIT_DEPS=(addict termcolor yapf platformdirs pycocotools shapely terminaltables prettytable
          wcwidth ftfy mat4py modelindex model-index ordered-set importlib-metadata lazy-importer
          setuptools)
# The GPU machine's Python packages (KINDS.md, read there 2026-11-17), normalized names.
# opencv-python is there as opencv-python-headless (the same cv2).
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
opencv-python optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp"
# cp312 wheels for x86-64 Linux: pip matches manylinux_2_N tags exactly, so name the usual ones.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3
        --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

SAY_TAG=gpu_kit
# shellcheck source=tools/shell_lib.sh
source "$ROOT/tools/shell_lib.sh"

# Every wheel's needs (Requires-Dist for Python 3.12 on x86-64 Linux, no extras) must be in
# the kit or on the machine; writes the kit's requirements.txt (name==version of each wheel).
closure_check() {
  "$PY" - "$1" "$DEVICE_HAS" <<'PYEOF'
import email, re, sys, zipfile
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
kit, device = Path(sys.argv[1]), set(sys.argv[2].split())
env = dict(python_version='3.12', python_full_version='3.12.3', sys_platform='linux',
           platform_system='Linux', platform_machine='x86_64', os_name='posix',
           implementation_name='cpython', platform_python_implementation='CPython', extra='')
norm = lambda name: re.sub(r'[-_.]+', '-', name).lower()
wheels = {}
for whl in sorted(kit.glob('*.whl')):
    with zipfile.ZipFile(whl) as z:
        meta = email.message_from_bytes(
            z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))))
    wheels[norm(meta['Name'])] = (meta['Version'], meta.get_all('Requires-Dist') or [])
missing = set()
for name, (_, needs) in wheels.items():
    for need in map(Requirement, needs):
        if need.marker is None or need.marker.evaluate(env):
            if norm(need.name) not in wheels and norm(need.name) not in device:
                missing.add(f'{norm(need.name)} (needed by {name})')
            elif norm(need.name) in wheels and not need.specifier.contains(
                    wheels[norm(need.name)][0], prereleases=True):
                missing.add(f'{need} (needed by {name}; the kit has '
                            f'{wheels[norm(need.name)][0]})')
if missing:
    print(f'gpu_kit: the kit lacks {", ".join(sorted(missing))}; add it to KIT_DEPS in '
          'tools/gpu_kit.sh (or to DEVICE_HAS if the GPU machine has it) and run it again.',
          file=sys.stderr)
    sys.exit(2)
(kit / 'requirements.txt').write_text(''.join(
    f'{name}=={version}\n' for name, (version, _) in sorted(wheels.items())
    if name != 'setuptools'))
print(f'closure: {len(wheels)} wheels, every Requires-Dist in the kit or on the machine')
PYEOF
}

if ((CHECK)); then
  [[ -d $KIT ]] || { echo "gpu_kit: no kit at $KIT; run make gpu-kit first." >&2; exit 2; }
  closure_check "$KIT"
  exit 0
fi
if ((!PLAN)) && ! "$PY" -c 'import pip' >/dev/null 2>&1; then
  echo "gpu_kit: $PY has no pip; pass PY=<a python with pip> (make gpu-kit uses .venv)." >&2
  exit 2
fi
TMP="$KIT.tmp"
say "kit: $KIT (cp312 wheels of ${MM_PACKAGES[*]}, their missing needs, mmcv $MMCV_VERSION sdist)"
run rm -rf "$TMP"
run mkdir -p "$TMP"
run_pip download -q --no-deps "${TARGET[@]}" -d "$TMP" "${MM_PACKAGES[@]}" "${KIT_DEPS[@]}"
# The sdist: no build isolation, as tools/install_deps.sh (its setup.py imports torch).
run_pip download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" \
  -d "$TMP"
if ((PLAN)); then
  printf '[plan] closure check of %s (Requires-Dist: in the kit or DEVICE_HAS) -> %s\n' \
    "$TMP" "$TMP/requirements.txt"
else
  closure_check "$TMP"
fi
run rm -rf "$KIT"
run mv "$TMP" "$KIT"
if ((PLAN)); then
  printf '[plan] du -sb %s\n' "$KIT"
else
  bytes=$(du -sb "$KIT" | cut -f1)
  size=$(awk -v b="$bytes" 'BEGIN { printf "%.1f MiB", b / 1048576 }')
  say "done: $KIT holds $(find "$KIT" -type f | wc -l) files, $size" \
    "(everything a device call takes along: 64 MiB at most)"
fi
