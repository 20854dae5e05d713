"""tools/gpu_check.sh --dry-run: every step of the GPU check, on the CPU at toy sizes.

The GPU check runs only when a GPU is lent; its dry run keeps each of its steps (test
selection, the checkpoint it builds, the re-parameterize call, the benchmark flags and table)
exercised by the suite, so that a lent GPU is never wasted on a broken script.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS='1')
    result = subprocess.run(['bash', str(ROOT / 'tools' / 'gpu_check.sh'), '--dry-run'],
                            cwd=ROOT,
                            env=env,
                            capture_output=True,
                            text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ('1/3 CUDA tests', '2/3 tools/reparameterize.py --device cpu',
                 '3/3 tools/benchmark.py --device cpu', 'done: logs in'):
        assert step in out
    assert (tmp_path / 'deploy' / 'deploy.pth').is_file()
    table = [line for line in out.splitlines() if line.startswith('cls ')]
    modes = {tuple(line.split()[1:4]) for line in table}
    assert modes == {('resnet18', 'eager', 'plain'), ('resnet18', 'eager', 'orepa'),
                     ('resnet18', 'compiled', 'plain'), ('resnet18', 'compiled', 'orepa')}
    assert 'compiled / eager train step: cls resnet18 orepa' in out
    assert (tmp_path / 'benchmark' / 'benchmark.json').is_file()
