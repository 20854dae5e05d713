"""``tools/mmdeploy_check.sh --plan`` and its driver, checked without building or converting.

The real check (make deploy-check) builds a second venv with torch 2.1.2 and mmdeploy 1.3.1 and
takes half an hour the first time, so the suite runs the script's planning mode against a
stand-in demo folder, an empty wheel cache and a venv that does not exist: the plan must hold
every command of a cold run (venv, constrained pip installs, the mmcv build, the twelve
conversion and test steps) and touch nothing. The driver's pure parts (import blocker, paths,
table) are tested directly.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'tools' / 'mmdeploy_check.sh'
DRIVER = ROOT / 'tools' / 'mmdeploy_check.py'
CONSTRAINTS = ROOT / 'requirements' / 'constraints.txt'
TASKS = ('faster_rcnn', 'pspnet')


def load_driver():
    spec = importlib.util.spec_from_file_location('mmdeploy_check', DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_demo_dir(base: Path) -> Path:
    """What `make demo` leaves per task: demo_result.json, the dumped config, the checkpoints."""
    demo = base / 'demo'
    for task in TASKS:
        task_dir = demo / task
        (task_dir / 'deploy').mkdir(parents=True)
        for name in ('epoch_6.pth', f'{task}_orepa_r18_demo.py', 'deploy/deploy.pth',
                     'deploy/deploy_config.py'):
            (task_dir / name).write_text('')
        (task_dir / 'demo_result.json').write_text(
            json.dumps(
                dict(
                    checkpoint=str(task_dir / 'epoch_6.pth'),
                    deploy_checkpoint=str(task_dir / 'deploy' / 'deploy.pth'),
                    deploy_config=str(task_dir / 'deploy' / 'deploy_config.py'))))
    return demo


def run_plan(base: Path, demo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ['bash', str(SCRIPT), '--plan'],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            'PATH': '/usr/bin:/bin',
            'HOME': str(base),
            'OREPA_MM_CACHE': str(base / 'cache'),
            'MMDEPLOY_VENV': str(base / 'venv'),
            'DEMO_DIR': str(demo)
        })


@pytest.fixture(scope='module')
def cold(tmp_path_factory):
    base = tmp_path_factory.mktemp('cold')
    (base / 'cache').mkdir()
    demo = make_demo_dir(base)
    result = run_plan(base, demo)
    assert result.returncode == 0, result.stderr
    return base, demo, result.stdout.splitlines()


def test_plan_builds_nothing(cold):
    base, demo, _ = cold
    assert not any((base / 'cache').iterdir()), 'the plan must not write to the wheel cache'
    assert not (base / 'venv').exists()
    assert not (demo / 'mmdeploy').exists()


def test_plan_builds_the_verified_version_set(cold):
    base, _, plan = cold
    text = '\n'.join(plan)
    venv_python = base / 'venv' / 'bin' / 'python'
    assert f'[plan] python3 -m venv {base / "venv"}' in plan
    for step in ('torch==2.1.2 torchvision==0.16.2', 'mmengine==0.10.7',
                 '--no-binary :all: mmcv==2.1.0', 'export MMCV_WITH_OPS=1', 'wheel -c',
                 '--no-build-isolation --no-deps -w',
                 'mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 mmdeploy==1.3.1 '
                 'onnx==1.14.1 onnxruntime==1.15.1 protobuf==3.20.2'):
        assert step in text, f'the cold plan lacks {step!r}:\n{text}'
    # the mmcv wheel comes from the cache of install_deps.sh, under this torch's own key
    tag = subprocess.run(['python3', '-c', 'import sys; print("cp%d%d" % sys.version_info[:2])'],
                         capture_output=True,
                         text=True,
                         env={
                             'PATH': '/usr/bin:/bin'
                         },
                         check=True).stdout.strip()
    wheel = (
        base / 'cache' / 'wheels' / 'mmcv-2.1.0' / 'torch-2.1.2' / tag / 'cpu-ops' /
        f'mmcv-2.1.0-{tag}-{tag}-linux_x86_64.whl')
    assert [line for line in plan if str(wheel) in line] == [
        f'[plan] {venv_python} -m pip --disable-pip-version-check install -c {CONSTRAINTS} -q '
        f'--force-reinstall --no-deps {wheel}',
        f'[plan] {venv_python} -m pip --disable-pip-version-check install -c {CONSTRAINTS} -q '
        f'{wheel}'
    ]
    pip_calls = [line for line in plan if ' -m pip ' in line]
    assert len(pip_calls) == 8, text
    for line in pip_calls:
        assert line.startswith(f'[plan] {venv_python} -m pip'), line
        assert f'-c {CONSTRAINTS}' in line, f'unconstrained pip call: {line}'


def test_no_pip_call_bypasses_run_pip():
    """By construction: pip is called only through tools/shell_lib.sh's run_pip."""
    script = SCRIPT.read_text().splitlines()
    assert 'source "$ROOT/tools/shell_lib.sh"' in script
    assert [
        line for line in script
        if 'pip ' in line and not line.lstrip().startswith('#') and 'run_pip' not in line
    ] == []


def test_plan_runs_every_route_and_task(cold):
    base, demo, plan = cold
    python = base / 'venv' / 'bin' / 'python'
    steps = [line for line in plan if str(DRIVER) in line]
    assert len(steps) == 13, steps  # 2 routes x 2 tasks x 3 steps, then the table
    deploy_cfgs = {
        'faster_rcnn': ROOT / 'configs/deploy/detection_onnxruntime_dynamic.py',
        'pspnet': ROOT / 'configs/deploy/segmentation_onnxruntime_dynamic.py'
    }
    expected = []
    for task in TASKS:
        task_dir = demo / task
        work = demo / 'mmdeploy'
        routes = {
            'deployed': (f'env -u PYTHONPATH {python} {DRIVER} --block-orepa-mm',
                         task_dir / 'deploy/deploy_config.py', task_dir / 'deploy/deploy.pth'),
            'train-time': (f'env PYTHONPATH={ROOT} {python} {DRIVER} --import-orepa-mm',
                           task_dir / f'{task}_orepa_r18_demo.py', task_dir / 'epoch_6.pth')
        }
        for route, (prefix, cfg, ckpt) in routes.items():
            out = work / route / task
            head = f'[plan] {prefix}'
            expected += [
                f'{head} torch2onnx {deploy_cfgs[task]} {cfg} {ckpt} {out}',
                f'{head} test {deploy_cfgs[task]} {cfg} {out}/end2end.onnx {out} '
                f'{out}/ort.json',
                f'{head} test {deploy_cfgs[task]} {cfg} {ckpt} {out} {out}/pytorch.json'
            ]
    expected.append(f'[plan] python3 {DRIVER} table {demo / "mmdeploy"}')
    assert steps == expected


@pytest.mark.parametrize('name,task,outputs', [('detection', 'ObjectDetection', ['dets', 'labels']),
                                               ('segmentation', 'Segmentation', ['output'])])
def test_deploy_configs_are_shipped_flat(name, task, outputs):
    """mmdeploy's configs, _base_ chain merged: they load without mmdeploy's repository."""
    from mmengine import Config
    path = ROOT / 'configs' / 'deploy' / f'{name}_onnxruntime_dynamic.py'
    text = path.read_text()
    assert 'tag v1.3.1' in text and 'Apache License, Version 2.0' in text
    assert '_base_ =' not in text
    cfg = Config.fromfile(str(path))
    assert cfg.backend_config == dict(type='onnxruntime')
    assert cfg.codebase_config.task == task
    assert cfg.onnx_config.opset_version == 11 and cfg.onnx_config.output_names == outputs
    assert cfg.onnx_config.dynamic_axes['input'] == {0: 'batch', 2: 'height', 3: 'width'}


@pytest.mark.parametrize('missing', TASKS)
def test_refuses_without_the_demo(tmp_path, missing):
    (tmp_path / 'cache').mkdir()
    demo = make_demo_dir(tmp_path)
    (demo / missing / 'demo_result.json').unlink()
    result = run_plan(tmp_path, demo)
    assert result.returncode == 2
    assert result.stdout == ''
    assert result.stderr.count('\n') == 1
    assert result.stderr.startswith(f'error: {demo / missing / "demo_result.json"} is missing: '
                                    'run `make demo` first')


def test_refuses_an_unknown_argument(tmp_path):
    result = subprocess.run(['bash', str(SCRIPT), '--bogus'],
                            capture_output=True,
                            text=True,
                            timeout=60)
    assert result.returncode == 2
    assert 'unknown argument: --bogus' in result.stderr


def test_blocker_makes_orepa_mm_unimportable():
    """orepa_mm is importable in this venv; behind the driver's blocker it is not."""
    code = (f'import contextlib, importlib.util, io, runpy\n'
            f'assert importlib.util.find_spec("orepa_mm") is not None\n'
            f'driver = runpy.run_path({str(DRIVER)!r})\n'
            f'with contextlib.redirect_stdout(io.StringIO()):  # an empty table\n'
            f'    driver["main"](["--block-orepa-mm", "table", {str(DRIVER.parent)!r}])\n'
            f'for name in ("orepa_mm", "orepa_mm.cnn"):\n'
            f'    try:\n'
            f'        __import__(name)\n'
            f'    except ImportError as err:\n'
            f'        print(err)\n')
    result = subprocess.run([sys.executable, '-c', code],
                            capture_output=True,
                            text=True,
                            timeout=60,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    # a submodule import asks for its parent first: the parent's refusal is what raises
    assert result.stdout.splitlines() == 2 * [
        "import of 'orepa_mm' blocked: the deployed checkpoint route of "
        'tools/mmdeploy_check.sh must not need orepa_mm'
    ]


def test_route_paths(tmp_path):
    driver = load_driver()
    demo = make_demo_dir(tmp_path)
    task_dir = demo / 'pspnet'
    assert driver.route_paths(str(task_dir),
                              'train-time') == (str(task_dir / 'pspnet_orepa_r18_demo.py'),
                                                str(task_dir / 'epoch_6.pth'))
    assert driver.route_paths(str(task_dir),
                              'deployed') == (str(task_dir / 'deploy/deploy_config.py'),
                                              str(task_dir / 'deploy/deploy.pth'))
    (task_dir / 'deploy/deploy.pth').unlink()
    with pytest.raises(SystemExit, match='deploy.pth .*is missing: run `make demo` again'):
        driver.route_paths(str(task_dir), 'deployed')


def test_table(tmp_path):
    driver = load_driver()
    numbers = {
        ('deployed', 'faster_rcnn'): (0.385, 0.381),
        ('deployed', 'pspnet'): (44.34, 44.54),
        ('train-time', 'faster_rcnn'): (0.385, 0.381)
    }
    for (route, task), (torch_metric, ort_metric) in numbers.items():
        key = driver.METRICS[task][0]
        (tmp_path / route / task).mkdir(parents=True)
        for backend, value in (('pytorch', torch_metric), ('ort', ort_metric)):
            (tmp_path / route / task / f'{backend}.json').write_text(json.dumps({key: value}))
    (tmp_path / 'step_times.tsv').write_text('deployed pspnet: torch2onnx\t12.5 s\n'
                                             'train-time pspnet: torch2onnx\t4.5 s (failed, '
                                             'exit 1)\n')
    (tmp_path / 'train-time' / 'pspnet').mkdir(parents=True)
    (tmp_path / 'train-time' / 'pspnet' /
     'errors.txt').write_text('torch2onnx: AttributeError: no get_safe_globals\n')
    table, complete = driver.format_table(str(tmp_path))
    assert not complete  # train-time pspnet has no metrics
    assert table.splitlines() == [
        'route       task         metric    PyTorch  ONNX Runtime  ORT - PyTorch',
        '----------  -----------  --------  -------  ------------  -------------',
        'deployed    faster_rcnn  bbox mAP  0.385    0.381         -0.004',
        'deployed    pspnet       mIoU      44.34    44.54         +0.20',
        'train-time  faster_rcnn  bbox mAP  0.385    0.381         -0.004',
        'train-time  pspnet       mIoU      failed   failed        n/a', '',
        'why (the last line of each failed step; the log has the traceback):',
        '  train-time pspnet: torch2onnx: AttributeError: no get_safe_globals', '',
        'wall time per step:', '  deployed pspnet: torch2onnx: 12.5 s',
        '  train-time pspnet: torch2onnx: 4.5 s (failed, exit 1)'
    ]


def test_failed_step_leaves_one_line_for_the_table(tmp_path):
    """A step that raises exits 1 and appends its last line to WORK/errors.txt."""
    work = tmp_path / 'work'
    result = subprocess.run([
        sys.executable,
        str(DRIVER), '--threads', '1', 'torch2onnx',
        str(tmp_path / 'no_deploy_cfg.py'),
        str(tmp_path / 'no_model_cfg.py'),
        str(tmp_path / 'no.pth'),
        str(work)
    ],
                            capture_output=True,
                            text=True,
                            timeout=120,
                            cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert 'Traceback' in result.stderr
    lines = (work / 'errors.txt').read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith('torch2onnx: '), lines
