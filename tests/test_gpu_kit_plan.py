"""The GPU machine's path, checked here without network or GPU: the plans of tools/gpu_kit.sh
and tools/gpu_check.sh, and the kit's closure check on hand-made wheels.

The lent GPU machine has no network and no mm package, and a lent run is rare and short, so
its set-up must be right the first time: the kit is installed offline from the folder that
travels with the call (``--no-index --find-links``), mmcv's ops are built for that GPU only
(arch list, jobs, C++ standard), the sync-debug check runs first, and a missing kit is refused
in one sentence before anything runs. ``--plan`` prints every command and runs none.
"""
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / 'requirements' / 'constraints.txt'


@pytest.fixture(scope='module')
def bare_python(tmp_path_factory):
    """A Python without torch, mm packages or pip: what the plans must not depend on."""
    base = tmp_path_factory.mktemp('bare')
    venv.EnvBuilder(with_pip=False).create(base / 'venv')
    return str(base / 'venv' / 'bin' / 'python')


def _run(script, *args, **env):
    base = {'PATH': '/usr/bin:/bin', 'HOME': os.environ.get('HOME', '/tmp')}
    return subprocess.run(['bash', str(ROOT / 'tools' / script), *args],
                          cwd=ROOT,
                          capture_output=True,
                          text=True,
                          timeout=60,
                          env={
                              **base,
                              **env
                          })


@pytest.fixture
def kit(tmp_path):
    """A kit folder as gpu_kit.sh leaves it (contents are not read by the plan)."""
    kit = tmp_path / 'kit'
    kit.mkdir()
    (kit / 'requirements.txt').write_text('mmengine==0.10.7\n')
    (kit / 'mmcv-2.1.0.tar.gz').write_bytes(b'')
    return kit


def _check_plan(bare_python, kit, tmp_path, **env):
    result = _run(
        'gpu_check.sh',
        '--plan',
        PY=bare_python,
        GPU_KIT=str(kit),
        OUT=str(tmp_path / 'out'),
        TMPDIR=str(tmp_path / 'tmp'),
        **env)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'tmp').exists(), 'ran something'
    return result.stdout.splitlines()


def test_gpu_check_plan_installs_offline_and_builds_for_the_gpu_only(bare_python, kit, tmp_path):
    plan = _check_plan(bare_python, kit, tmp_path)
    commands = [
        line[len('[plan] '):] for line in plan
        if line.startswith('[plan] /') or line.startswith('[plan] env ')
    ]
    pip_calls = [c for c in commands if ' -m pip ' in c]
    assert len(pip_calls) == 3, plan
    for call in pip_calls:
        assert f'-c {CONSTRAINTS}' in call and '--no-index' in call and '--no-deps' in call
    installs = [c for c in pip_calls if f'--find-links {kit}' in c]
    assert [c.split()[-1] for c in installs] == ['setuptools', f'{kit}/requirements.txt']
    build = next(c for c in commands if c.startswith('env -C '))
    for flag in ('MMCV_WITH_OPS=1', 'FORCE_CUDA=1', 'TORCH_CUDA_ARCH_LIST=9.0', 'MAX_JOBS=16',
                 'CPATH=<site-packages>/nvidia/cu13/include', '--no-build-isolation'):
        assert flag in build.split(), (flag, build)
    # torch 2.11 (the bare python has none: the GPU machine's is assumed): mmcv's own C++17.
    assert any('(torch 2.11.0: -std=c++17)' in line for line in plan), plan
    assert not any('sed -i' in c for c in commands), 'C++17 needs no edit of setup.py'


def test_gpu_check_plan_runs_the_sync_debug_check_first(bare_python, kit, tmp_path):
    plan = _check_plan(bare_python, kit, tmp_path)
    pytest_calls = [line for line in plan if ' -m pytest ' in line]
    assert pytest_calls[0].endswith('tests/test_cuda.py -k make_no_sync'), pytest_calls
    assert pytest_calls[1].endswith('-k (cuda or CUDA) and not make_no_sync'), pytest_calls
    label = next(i for i, line in enumerate(plan) if 'sync-debug check' in line)
    assert "torch.cuda.set_sync_debug_mode('error')" in plan[label]
    assert 'the stock ResNet as the control' in plan[label]
    assert label < plan.index(next(line for line in plan if ' -m pytest ' in line))
    bench = [line for line in plan if 'tools/benchmark.py' in line and '[plan]' in line]
    assert len(bench) == 2 and all('--device cuda' in line for line in bench)
    assert '--workloads cls' in bench[0] and '--modes eager compiled' in bench[0]
    assert '--workloads det' in bench[1]


def test_gpu_check_plan_uses_cxx20_from_torch_2_12(kit, tmp_path):
    """The venv's torch (>= 2.12) needs C++20: the plan edits mmcv's -std=c++17."""
    import torch
    major, minor = (int(x) for x in torch.__version__.split('.')[:2])
    assert (major, minor) >= (2, 12), 'this test needs a torch >= 2.12 in the test venv'
    plan = _check_plan(sys.executable, kit, tmp_path)
    seds = [line for line in plan if line.startswith('[plan] sed -i ')]
    assert len(seds) == 1 and "s/'-std=c++17'/'-std=c++20'/g" in seds[0], plan


def test_gpu_check_refuses_a_missing_kit_in_one_sentence(bare_python, tmp_path):
    for mode in (['--plan'], []):
        # Without --plan the bare python has no torch: the refusal comes first, about the GPU.
        result = _run(
            'gpu_check.sh',
            *mode,
            PY=bare_python,
            GPU_KIT=str(tmp_path / 'none'),
            OUT=str(tmp_path / 'out'))
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('gpu_check: ') and lines[0].endswith('.')
    plan_refusal = _run(
        'gpu_check.sh', '--plan', PY=bare_python, GPU_KIT=str(tmp_path / 'none')).stderr
    assert f'{tmp_path / "none"} holds no GPU kit' in plan_refusal
    assert "run 'make gpu-kit'" in plan_refusal
    assert 'sees no CUDA device' in result.stderr


def test_gpu_check_refuses_an_unknown_option(bare_python):
    result = _run('gpu_check.sh', '--gpu', PY=bare_python)
    assert result.returncode == 2
    assert result.stderr == ("gpu_check: unknown option '--gpu'; pass --dry-run, --plan or "
                             'nothing.\n')


def test_gpu_kit_plan_downloads_cp312_wheels_and_the_mmcv_sdist(bare_python, tmp_path):
    kit = tmp_path / 'kit'
    result = _run('gpu_kit.sh', '--plan', str(kit), PY=bare_python)
    assert result.returncode == 0, result.stderr
    assert not kit.exists() and not Path(f'{kit}.tmp').exists(), 'the plan wrote the kit'
    plan = result.stdout.splitlines()
    pip_calls = [line for line in plan if ' -m pip ' in line]
    assert len(pip_calls) == 2, plan
    for call in pip_calls:
        assert f'-c {CONSTRAINTS}' in call and '--no-deps' in call and f'-d {kit}.tmp' in call
    wheels, sdist = pip_calls
    for flag in ('--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312',
                 '--platform manylinux2014_x86_64', 'mmengine==0.10.7', 'mmdet==3.3.0',
                 'mmsegmentation==1.2.2', 'mmpretrain==1.2.0', 'setuptools'):
        assert flag in wheels, flag
    assert ' numpy' not in wheels, "the machine's numpy 2.x is kept"
    assert '--no-binary :all: mmcv==2.1.0' in sdist
    assert plan[-3:] == [
        f'[plan] rm -rf {kit}', f'[plan] mv {kit}.tmp {kit}', f'[plan] du -sb {kit}'
    ]


def _wheel(kit, name, version, *needs):
    """A minimal wheel: only its METADATA, which is all the closure check reads."""
    meta = ['Metadata-Version: 2.1', f'Name: {name}', f'Version: {version}']
    meta += [f'Requires-Dist: {need}' for need in needs]
    with zipfile.ZipFile(kit / f'{name}-{version}-py3-none-any.whl', 'w') as z:
        z.writestr(f'{name}-{version}.dist-info/METADATA', '\n'.join(meta) + '\n')


def test_gpu_kit_check_accepts_a_closed_kit_and_writes_its_requirements(tmp_path):
    kit = tmp_path / 'kit'
    kit.mkdir()
    _wheel(kit, 'mmengine', '0.10.7', 'addict', 'numpy', 'opencv-python>=3',
           'regex; sys_platform == "win32"', 'tomli; python_version < "3.11"',
           'lmdb; extra == "all"')
    _wheel(kit, 'addict', '2.4.0')
    _wheel(kit, 'setuptools', '80.10.2')
    result = _run('gpu_kit.sh', '--check', str(kit), PY=sys.executable)
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'closure: 3 wheels, every Requires-Dist in the kit or on the machine\n'
    # setuptools is installed on its own, first: not in the requirements file.
    assert (kit / 'requirements.txt').read_text() == 'addict==2.4.0\nmmengine==0.10.7\n'


def test_gpu_kit_check_names_what_the_kit_lacks(tmp_path):
    kit = tmp_path / 'kit'
    kit.mkdir()
    _wheel(kit, 'mmdet', '3.3.0', 'terminaltables', 'Shapely', 'scipy')
    _wheel(kit, 'shapely', '1.8.0')
    _wheel(kit, 'prettytable', '3.19.0', 'wcwidth>=0.2')
    _wheel(kit, 'wcwidth', '0.1.0')
    result = _run('gpu_kit.sh', '--check', str(kit), PY=sys.executable)
    assert result.returncode == 2
    assert result.stderr == (
        'gpu_kit: the kit lacks terminaltables (needed by mmdet), wcwidth>=0.2 (needed by '
        'prettytable; the kit has 0.1.0); add it to KIT_DEPS in tools/gpu_kit.sh (or to '
        'DEVICE_HAS if the GPU machine has it) and run it again.\n')
    assert not (kit / 'requirements.txt').exists()
