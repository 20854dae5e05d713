"""The cold install path, checked without installing: ``tools/install_deps.sh --plan``.

Every developer machine has a warm mmcv wheel cache, so CI never takes the cold path. This runs
the script's planning mode against an empty throwaway venv and an empty wheel cache, which
makes it print every pip call a first install makes (the mmcv build included), and checks that
each one carries the project's constraints.
"""
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / 'requirements' / 'constraints.txt'


@pytest.fixture(scope='module')
def cold_plan(tmp_path_factory):
    base = tmp_path_factory.mktemp('cold')
    venv.EnvBuilder(with_pip=False).create(base / 'venv')
    python = base / 'venv' / 'bin' / 'python'
    cache = base / 'cache'
    cache.mkdir()
    result = subprocess.run(
        ['bash', str(ROOT / 'tools' / 'install_deps.sh'), '--plan',
         str(python)],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            'PATH': '/usr/bin:/bin',
            'HOME': str(base),
            'OREPA_MM_CACHE': str(cache)
        })
    assert result.returncode == 0, result.stderr
    assert not any(cache.iterdir()), 'the plan must not write to the wheel cache'
    return result.stdout.splitlines()


def test_plan_covers_every_step_of_a_cold_install(cold_plan):
    plan = '\n'.join(cold_plan)
    for step in ('install -c', 'torch==', 'mmengine', 'download', 'mmcv==2.1.0', 'wheel -c',
                 'requirements.txt', '-e ', 'build_ext --inplace', 'orepa_mm.utils.env_report'):
        assert step in plan, f'the cold plan lacks {step!r}:\n{plan}'


def test_every_pip_call_carries_the_constraints(cold_plan):
    pip_calls = [line for line in cold_plan if ' -m pip ' in line]
    assert len(pip_calls) >= 7, cold_plan
    for line in pip_calls:
        assert f'-c {CONSTRAINTS}' in line, f'unconstrained pip call: {line}'


def test_constraints_cap_what_drifts():
    pins = {line.split('#')[0].strip() for line in CONSTRAINTS.read_text().splitlines()}
    assert {'setuptools<81', 'numpy<2', 'opencv-python<4.12'} <= pins


def _pip_calls(script):
    lines = (ROOT / 'tools' / script).read_text().splitlines()
    return [line for line in lines if ' -m pip ' in line and not line.lstrip().startswith('#')]


def test_no_pip_call_bypasses_run_pip():
    """By construction: pip appears only inside run_pip (tools/shell_lib.sh), which the install
    scripts source."""
    calls = _pip_calls('shell_lib.sh')
    assert len(calls) == 1 and '"$sub" -c "$CONSTRAINTS"' in calls[0], calls
    for script in ('install_deps.sh', 'gpu_kit.sh'):
        assert _pip_calls(script) == [], script
        assert 'source "$ROOT/tools/shell_lib.sh"' in (ROOT / 'tools' / script).read_text()


@pytest.mark.slow
def test_env_report_is_one_line():
    result = subprocess.run([sys.executable, '-m', 'orepa_mm.utils.env_report'],
                            capture_output=True,
                            text=True,
                            timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    for part in ('torch ', 'mmcv ', 'mmdet ', 'mmseg ', 'mmpretrain ', 'fused CPU loops'):
        assert part in lines[0]
