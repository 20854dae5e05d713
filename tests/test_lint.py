"""The code style of setup.cfg holds: flake8 and isort find nothing in the package, tools, tests.

Both run as the pre-commit hooks run them (.pre-commit-config.yaml), from the repository root
with setup.cfg's settings, so a failure here is what `pre-commit run --all-files` would say.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ['orepa_mm', 'tools', 'tests', 'configs', 'setup.py']


def _run(*args):
    return subprocess.run([sys.executable, '-m', *args],
                          cwd=ROOT,
                          capture_output=True,
                          text=True,
                          timeout=300)


def test_flake8_is_clean():
    result = _run('flake8', *TREES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_isort_is_clean():
    result = _run('isort', '--check-only', '--diff', *TREES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_flake8_reports_what_it_should(tmp_path):
    """The check can fail: a long line and an unused import are reported with setup.cfg's width
    (flake8 reads the configuration of the directory it runs in)."""
    scratch = tmp_path / 'scratch.py'
    scratch.write_text('import os\n' + 'x = ' + '1 + ' * 24 + '1\n')  # 101 columns
    result = _run('flake8', str(scratch))
    assert result.returncode == 1
    assert ' F401 ' in result.stdout and ' E501 ' in result.stdout
